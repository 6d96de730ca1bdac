//! Prometheus metrics of one node, served at `GET /metrics`.
//!
//! Counters are plain atomics updated on the paths they describe; nothing here
//! allocates per event. Names follow Prometheus conventions (`herald_` prefix,
//! `_total` for counters); `docs/observability.md` lists them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label for a disconnect reason or reset reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Stable reason name.
    pub reason: &'static str,
}

/// Label for a gossip member state.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    /// `alive`, `suspect`, `dead` or `left`.
    pub state: &'static str,
}

/// Every metric the node exports.
#[derive(Debug)]
pub struct Metrics {
    /// Seconds from the bus storing an event to it being written to a stream.
    pub delivery_latency: Histogram,
    /// Open SSE streams.
    pub connections_open: Gauge,
    /// Streams opened.
    pub connects: Counter,
    /// Streams closed, by reason.
    pub disconnects: Family<ReasonLabel, Counter>,
    /// Streams cut because their queue filled.
    pub slow_disconnects: Counter,
    /// Events accepted by `POST /v1/publish`.
    pub events_published: Counter,
    /// Event frames written to streams (live and replayed).
    pub events_delivered: Counter,
    /// Bytes written to streams.
    pub bytes_written: Counter,
    /// Streams that resumed from a `Last-Event-ID`.
    pub replays: Counter,
    /// Events sent by replays.
    pub replayed_events: Counter,
    /// `herald.reset` events sent, by reason.
    pub resets: Family<ReasonLabel, Counter>,
    /// Stream requests refused by a limit.
    pub rejected_streams: Family<ReasonLabel, Counter>,
    /// Live messages received from the bus (only followed targets).
    pub bus_messages_received: Counter,
    /// Live gaps filled from the stream.
    pub gap_repairs: Counter,
    /// Stream leader elections this node heard of (each fills every
    /// followed target from the stream).
    pub stream_leader_changes: Counter,
    /// Times this node found the stored history changed under it (lost
    /// acknowledged writes, a recreated stream) and ended every stream.
    pub history_changes: Counter,
    /// Bus messages dropped as undeliverable (bad subject, UTF-8, type, size).
    pub bus_bad_events: Counter,
    /// 1 while the NATS connection is up (NATS bus only).
    pub nats_connected: Gauge,
    /// Events waiting in connection queues, all connections together (set
    /// when metrics are scraped).
    pub queued_events: Gauge,
    /// Cluster members as this node sees them, by state (itself included).
    pub cluster_members: Family<StateLabel, Gauge>,
    /// Streams this node asked to move elsewhere (rebalancing).
    pub streams_moved: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            // 100 µs to ~52 s.
            delivery_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 20)),
            connections_open: Gauge::default(),
            connects: Counter::default(),
            disconnects: Family::default(),
            slow_disconnects: Counter::default(),
            events_published: Counter::default(),
            events_delivered: Counter::default(),
            bytes_written: Counter::default(),
            replays: Counter::default(),
            replayed_events: Counter::default(),
            resets: Family::default(),
            rejected_streams: Family::default(),
            bus_messages_received: Counter::default(),
            gap_repairs: Counter::default(),
            stream_leader_changes: Counter::default(),
            history_changes: Counter::default(),
            bus_bad_events: Counter::default(),
            nats_connected: Gauge::default(),
            queued_events: Gauge::default(),
            cluster_members: Family::default(),
            streams_moved: Counter::default(),
        }
    }
}

impl Metrics {
    /// Renders every metric in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut registry = Registry::with_prefix("herald");
        registry.register(
            "connections_open",
            "Open SSE streams on this node",
            self.connections_open.clone(),
        );
        registry.register("connects", "SSE streams opened", self.connects.clone());
        registry.register(
            "disconnects",
            "SSE streams closed, by reason",
            self.disconnects.clone(),
        );
        registry.register(
            "slow_disconnects",
            "SSE streams cut because the client read too slowly",
            self.slow_disconnects.clone(),
        );
        registry.register(
            "events_published",
            "Events accepted over HTTP publish",
            self.events_published.clone(),
        );
        registry.register(
            "events_delivered",
            "Event frames written to SSE streams",
            self.events_delivered.clone(),
        );
        registry.register(
            "bytes_written",
            "Bytes written to SSE streams",
            self.bytes_written.clone(),
        );
        registry.register(
            "replays",
            "Streams resumed from a Last-Event-ID",
            self.replays.clone(),
        );
        registry.register(
            "replayed_events",
            "Events sent by replays",
            self.replayed_events.clone(),
        );
        registry.register(
            "resets",
            "herald.reset events sent, by reason",
            self.resets.clone(),
        );
        registry.register(
            "rejected_streams",
            "Stream requests refused by a limit, by reason",
            self.rejected_streams.clone(),
        );
        registry.register(
            "bus_messages_received",
            "Live messages received from the bus for targets this node follows",
            self.bus_messages_received.clone(),
        );
        registry.register(
            "gap_repairs",
            "Live gaps filled from the stream",
            self.gap_repairs.clone(),
        );
        registry.register(
            "stream_leader_changes",
            "Stream leader elections this node heard of; each fills every followed target from the stream",
            self.stream_leader_changes.clone(),
        );
        registry.register(
            "history_changes",
            "Times the stored history changed under this node (lost writes, recreated stream); every stream resumed with herald.reset",
            self.history_changes.clone(),
        );
        registry.register(
            "bus_bad_events",
            "Bus messages dropped as undeliverable",
            self.bus_bad_events.clone(),
        );
        registry.register(
            "nats_connected",
            "1 while the NATS connection is up",
            self.nats_connected.clone(),
        );
        registry.register(
            "queued_events",
            "Events waiting in connection queues",
            self.queued_events.clone(),
        );
        registry.register(
            "cluster_members",
            "Cluster members as this node sees them through gossip, by state",
            self.cluster_members.clone(),
        );
        registry.register(
            "streams_moved",
            "Streams asked to reconnect to another node by rebalancing",
            self.streams_moved.clone(),
        );
        registry.register(
            "delivery_latency_seconds",
            "Time from the bus storing an event to its write to a stream",
            self.delivery_latency.clone(),
        );
        if let Some(bytes) = crate::heap::allocated_bytes() {
            let live = Gauge::<i64>::default();
            live.set(i64::try_from(bytes).unwrap_or(i64::MAX));
            registry.register(
                "heap_allocated_bytes",
                "Heap bytes allocated and not yet freed (built with --features heap-stats)",
                live,
            );
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}
