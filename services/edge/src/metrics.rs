//! Prometheus metrics of one node, served at `GET /metrics`.
//!
//! Counters are plain atomics updated on the paths they describe; nothing here
//! allocates per event. Names follow Prometheus conventions (`herald_` prefix,
//! `_total` for counters); `docs/observability.md` lists them.
//!
//! Each metric is declared once, in the [`metrics!`] list below: its field,
//! type, name and help text. The list generates the [`Metrics`] struct and its
//! constructor, which registers every metric as it creates it; [`Metrics::render`]
//! only encodes that registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label for a disconnect reason or reset reason.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    /// Stable reason name.
    pub(crate) reason: &'static str,
}

/// Label for a gossip member state.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct StateLabel {
    /// `alive`, `suspect`, `dead` or `left`.
    pub(crate) state: &'static str,
}

/// Label for a token issuer (its `iss`, or `default`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct IssuerLabel {
    /// The issuer, as configured (a bounded set).
    pub(crate) issuer: String,
}

impl IssuerLabel {
    /// The label of `issuer`.
    pub(crate) fn new(issuer: &str) -> Self {
        IssuerLabel {
            issuer: issuer.to_owned(),
        }
    }
}

/// Label for a signing key refresh: the issuer and how it went.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KeyRefreshLabel {
    /// The issuer, as configured.
    pub(crate) issuer: String,
    /// `ok` or `failed`.
    pub(crate) outcome: &'static str,
}

impl KeyRefreshLabel {
    /// The label of a refresh of `issuer`'s keys that ended with `outcome`.
    pub(crate) fn new(issuer: &str, outcome: &'static str) -> Self {
        KeyRefreshLabel {
            issuer: issuer.to_owned(),
            outcome,
        }
    }
}

/// Declares [`Metrics`] from one list. Each entry is
/// `/// doc` `field: Type [= initial value], "name", "help";`: the
/// field the code updates, its Prometheus name (after the `herald_` prefix;
/// counters get `_total` when encoded) and help text, and how it is built when
/// `Type::default()` does not fit. `GET /metrics` lists them in this order.
macro_rules! metrics {
    ($(
        $(#[doc = $doc:literal])*
        $field:ident: $ty:ty $(= $init:expr)?, $name:literal, $help:literal;
    )*) => {
        /// Every metric the node exports.
        #[derive(Debug)]
        pub(crate) struct Metrics {
            $(
                $(#[doc = $doc])*
                pub(crate) $field: $ty,
            )*
            /// Live heap bytes, set when rendered; only when the node counts
            /// them (`--features heap-stats`, see `heap.rs`).
            heap_allocated: Option<Gauge>,
            /// Allocations and their bytes since the start, set when
            /// rendered; only when the node counts them (`--features
            /// count-allocations`, see `heap.rs`).
            allocations: Option<AllocationCounters>,
            /// Every metric above, registered when it was created.
            registry: Registry,
        }

        impl Default for Metrics {
            fn default() -> Self {
                let mut registry = Registry::with_prefix("herald");
                $(
                    let $field: $ty = metrics!(@init $($init)?);
                    registry.register($name, $help, $field.clone());
                )*
                let heap_allocated = crate::heap::allocated_bytes().map(|_| {
                    let gauge = Gauge::default();
                    registry.register(
                        "heap_allocated_bytes",
                        "Heap bytes allocated and not yet freed (built with --features heap-stats)",
                        gauge.clone(),
                    );
                    gauge
                });
                let allocations = crate::heap::allocation_totals().map(|_| {
                    let counters = AllocationCounters::default();
                    registry.register(
                        "allocations",
                        "Heap allocations since the start (built with --features count-allocations)",
                        counters.allocations.clone(),
                    );
                    registry.register(
                        "allocated_bytes",
                        "Bytes asked for by heap allocations since the start (built with --features count-allocations)",
                        counters.bytes.clone(),
                    );
                    counters
                });
                Metrics {
                    $($field,)*
                    heap_allocated,
                    allocations,
                    registry,
                }
            }
        }
    };
    (@init) => {
        Default::default()
    };
    (@init $init:expr) => {
        $init
    };
}

metrics! {
    /// Open SSE streams.
    connections_open: Gauge, "connections_open", "Open SSE streams on this node";
    /// Streams opened.
    connects: Counter, "connects", "SSE streams opened";
    /// Streams closed, by reason.
    disconnects: Family<ReasonLabel, Counter>, "disconnects", "SSE streams closed, by reason";
    /// Streams cut because their queue filled.
    slow_disconnects: Counter, "slow_disconnects",
        "SSE streams cut because the client read too slowly";
    /// Events accepted by `POST /v1/publish`.
    events_published: Counter, "events_published", "Events accepted over HTTP publish";
    /// Event frames written to streams (live and replayed).
    events_delivered: Counter, "events_delivered", "Event frames written to SSE streams";
    /// Bytes written to streams.
    bytes_written: Counter, "bytes_written", "Bytes written to SSE streams";
    /// Streams that resumed from a `Last-Event-ID`.
    replays: Counter, "replays", "Streams resumed from a Last-Event-ID";
    /// Events sent by replays.
    replayed_events: Counter, "replayed_events", "Events sent by replays";
    /// `herald.reset` events sent, by reason.
    resets: Family<ReasonLabel, Counter>, "resets", "herald.reset events sent, by reason";
    /// Stream requests refused by a limit.
    rejected_streams: Family<ReasonLabel, Counter>, "rejected_streams",
        "Stream requests refused by a limit, by reason";
    /// Live messages received from the bus (only followed targets).
    bus_messages_received: Counter, "bus_messages_received",
        "Live messages received from the bus for targets this node follows";
    /// Live gaps filled from the stream.
    gap_repairs: Counter, "gap_repairs", "Live gaps filled from the stream";
    /// Stream leader elections this node heard of (each fills every
    /// followed target from the stream).
    stream_leader_changes: Counter, "stream_leader_changes",
        "Stream leader elections this node heard of; each fills every followed target from the stream";
    /// Times this node found the stored history changed under it (lost
    /// acknowledged writes, a recreated stream) and ended every stream.
    history_changes: Counter, "history_changes",
        "Times the stored history changed under this node (lost writes, recreated stream); every stream resumed with herald.reset";
    /// Checks of followed targets against the stream (NATS bus: each slice
    /// of the periodic round, and each check of every target): each finds
    /// stored events whose live copy never arrived.
    live_checks: Counter, "live_checks",
        "Checks of followed targets against the stream (slices of the periodic round, checks of every target) for events whose live copy never arrived";
    /// Requests the live checks sent to the stream (one batched read per
    /// slice or per 1,000 targets on nats-server 2.11+, one per target before).
    live_check_reads: Counter, "live_check_reads",
        "Stream reads made by the live checks";
    /// Stored messages the live checks were answered with: one per checked
    /// target in a full round, one per target with events since its last
    /// check in the rounds between.
    live_check_answers: Counter, "live_check_answers",
        "Stored messages the live checks were answered with";
    /// Followed targets a since round left out because a live copy
    /// connected to their chain since the check last came by (that copy
    /// showed the chain complete; the next visit reads it).
    live_check_left_out: Counter, "live_check_left_out",
        "Targets the live checks left out because a live copy had just connected";
    /// Bus messages dropped as undeliverable (bad subject, UTF-8, type, size).
    bus_bad_events: Counter, "bus_bad_events", "Bus messages dropped as undeliverable";
    /// 1 while the NATS connection is up (NATS bus only).
    nats_connected: Gauge, "nats_connected", "1 while the NATS connection is up";
    /// Times async-nats dropped live messages because the live buffer
    /// (`nats.subscription_capacity`, shared by every followed target) was
    /// full; each asks for an immediate check of every followed target.
    nats_slow_consumer: Counter, "nats_slow_consumer",
        "Times the NATS client dropped messages for a full live buffer (nats.subscription_capacity, shared by every followed target); each triggers a check of every followed target";
    /// Followed targets no stream follows any more, kept for
    /// `nats.linger_secs` in case one comes back.
    nats_lingering: Gauge, "nats_lingering",
        "Targets whose last stream closed, still followed for nats.linger_secs in case a client comes back";
    /// Resumes answered from the events recorded while their targets
    /// lingered (no stream read).
    nats_recorded_replays: Counter, "nats_recorded_replays",
        "Resumes answered from the events this node recorded while their targets lingered, without reading the stream";
    /// Events waiting in connection queues, all connections together (set
    /// when metrics are scraped).
    queued_events: Gauge, "queued_events", "Events waiting in connection queues";
    /// Cluster members as this node sees them, by state (itself included).
    cluster_members: Family<StateLabel, Gauge>, "cluster_members",
        "Cluster members as this node sees them through gossip, by state";
    /// Streams this node asked to move elsewhere (rebalancing).
    streams_moved: Counter, "streams_moved",
        "Streams asked to reconnect to another node by rebalancing";
    /// Disconnect orders (`POST /v1/disconnect`, taken by any node) this
    /// node carried out: each ends every local stream of one user (the
    /// streams are counted in `disconnects` as `disconnected` or `revoked`).
    user_disconnects: Counter, "user_disconnects",
        "Disconnect orders this node carried out (POST /v1/disconnect on any node), each ending every local stream of one user";
    /// Stream requests answered 204 because the token was revoked.
    revoked_refusals: Counter, "revoked_refusals",
        "Stream requests refused with 204 because the user's token was revoked";
    /// Gossip datagrams dropped before the membership saw them, by reason
    /// (`malformed`, `bad_tag`, `stale`, `replayed`, `too_many_senders`).
    gossip_rejected: Family<ReasonLabel, Counter>, "gossip_rejected",
        "Gossip datagrams dropped (unauthenticated, stale or replayed), by reason";
    /// Signing key loads (JWKS file, URL or OIDC issuer), by issuer and
    /// outcome (`ok`, `failed`); a failure keeps the last good keys.
    jwks_refreshes: Family<KeyRefreshLabel, Counter>, "jwks_refreshes",
        "Signing key loads from a JWKS file, URL or OIDC issuer, by issuer and outcome (ok, failed); a failure keeps the last good keys";
    /// Tokens naming an unknown `kid` that caused no fetch, because one was
    /// made less than `auth.jwks_min_refresh_secs` ago.
    jwks_refresh_throttled: Family<IssuerLabel, Counter>, "jwks_refresh_throttled",
        "Tokens naming an unknown kid that caused no key fetch, because one was made less than auth.jwks_min_refresh_secs ago";
    /// Signing keys held, by issuer.
    jwks_keys: Family<IssuerLabel, Gauge>, "jwks_keys", "Signing keys held from a JWKS, by issuer";
    /// Seconds from the bus storing an event to it being written to a stream.
    delivery_latency: Histogram = Histogram::new(exponential_buckets(0.0001, 2.0, 20)), // 100 µs to ~52 s.
        "delivery_latency_seconds", "Time from the bus storing an event to its write to a stream";
    /// Seconds from the bus storing an event to this node taking its live
    /// copy (NATS bus): the part of `delivery_latency` spent before the edge.
    bus_lag: Histogram = Histogram::new(exponential_buckets(0.0001, 2.0, 20)),
        "bus_lag_seconds", "Time from the bus storing an event to this node taking its live copy (NATS bus)";
}

/// The allocator's totals as counters (`count-allocations`).
#[derive(Debug, Default)]
struct AllocationCounters {
    allocations: Counter,
    bytes: Counter,
}

impl Metrics {
    /// Renders every metric in the Prometheus text format.
    pub(crate) fn render(&self) -> String {
        if let (Some(gauge), Some(bytes)) = (&self.heap_allocated, crate::heap::allocated_bytes()) {
            gauge.set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        if let (Some(counters), Some(totals)) =
            (&self.allocations, crate::heap::allocation_totals())
        {
            // The allocator's own totals: they only grow, so storing them
            // keeps the counters monotonic.
            counters
                .allocations
                .inner()
                .store(totals.allocations, std::sync::atomic::Ordering::Relaxed);
            counters
                .bytes
                .inner()
                .store(totals.bytes, std::sync::atomic::Ordering::Relaxed);
        }
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// Names and types are what `docs/observability.md`, the dashboards and
    /// the alerts read; a change here is a change of the interface.
    #[test]
    fn every_metric_is_rendered_once_under_its_documented_name_and_type() {
        let metrics = Metrics::default();
        let reason = ReasonLabel { reason: "slow" };
        metrics.disconnects.get_or_create(&reason).inc();
        metrics.resets.get_or_create(&reason).inc();
        metrics.rejected_streams.get_or_create(&reason).inc();
        metrics.gossip_rejected.get_or_create(&reason).inc();
        metrics
            .jwks_refreshes
            .get_or_create(&KeyRefreshLabel::new("https://idp.example.com/", "ok"))
            .inc();
        let issuer = IssuerLabel::new("https://idp.example.com/");
        metrics.jwks_refresh_throttled.get_or_create(&issuer).inc();
        metrics.jwks_keys.get_or_create(&issuer).set(2);
        let alive = StateLabel { state: "alive" };
        metrics.cluster_members.get_or_create(&alive).set(1);
        let text = metrics.render();
        let types: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .collect();
        let expected = [
            "herald_connections_open gauge",
            "herald_connects counter",
            "herald_disconnects counter",
            "herald_slow_disconnects counter",
            "herald_events_published counter",
            "herald_events_delivered counter",
            "herald_bytes_written counter",
            "herald_replays counter",
            "herald_replayed_events counter",
            "herald_resets counter",
            "herald_rejected_streams counter",
            "herald_bus_messages_received counter",
            "herald_gap_repairs counter",
            "herald_stream_leader_changes counter",
            "herald_history_changes counter",
            "herald_live_checks counter",
            "herald_live_check_reads counter",
            "herald_live_check_answers counter",
            "herald_live_check_left_out counter",
            "herald_bus_bad_events counter",
            "herald_nats_connected gauge",
            "herald_nats_slow_consumer counter",
            "herald_nats_lingering gauge",
            "herald_nats_recorded_replays counter",
            "herald_queued_events gauge",
            "herald_cluster_members gauge",
            "herald_streams_moved counter",
            "herald_user_disconnects counter",
            "herald_revoked_refusals counter",
            "herald_gossip_rejected counter",
            "herald_jwks_refreshes counter",
            "herald_jwks_refresh_throttled counter",
            "herald_jwks_keys gauge",
            "herald_delivery_latency_seconds histogram",
            "herald_bus_lag_seconds histogram",
        ];
        assert_eq!(types[..expected.len()], expected, "{text}");
        // Built with heap-stats, the live heap comes last, then (with
        // count-allocations) the allocation totals; without, not at all.
        let heap = crate::heap::allocated_bytes().map(|_| "herald_heap_allocated_bytes gauge");
        let totals = crate::heap::allocation_totals().map(|_| {
            [
                "herald_allocations counter",
                "herald_allocated_bytes counter",
            ]
        });
        let extra: Vec<&str> = heap
            .into_iter()
            .chain(totals.into_iter().flatten())
            .collect();
        assert_eq!(types[expected.len()..], extra, "{text}");
        assert!(
            text.contains("herald_disconnects_total{reason=\"slow\"} 1"),
            "{text}"
        );
    }

    /// A scrape reads the shared counters, it does not copy them.
    #[test]
    fn a_rendering_shows_the_value_the_field_holds_now() {
        let metrics = Metrics::default();
        metrics.gap_repairs.inc();
        assert!(metrics.render().contains("herald_gap_repairs_total 1"));
        metrics.gap_repairs.inc();
        assert!(metrics.render().contains("herald_gap_repairs_total 2"));
    }

    /// With `count-allocations`, a scrape shows the allocator's totals as
    /// they are now: an allocation made between two scrapes moves them.
    #[cfg(feature = "count-allocations")]
    #[test]
    fn a_scrape_shows_allocations_made_since_the_last_one() {
        const BLOCK: usize = 1 << 20;
        let metrics = Metrics::default();
        let read = |text: &str, name: &str| -> u64 {
            text.lines()
                .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {text}"))
        };
        let first = metrics.render();
        let block = std::hint::black_box(vec![1u8; BLOCK]);
        let second = metrics.render();
        drop(block);
        assert!(
            read(&second, "herald_allocations_total ") > read(&first, "herald_allocations_total "),
            "{first}\n{second}"
        );
        assert!(
            read(&second, "herald_allocated_bytes_total ")
                >= read(&first, "herald_allocated_bytes_total ") + BLOCK as u64,
            "{first}\n{second}"
        );
    }
}
