//! Delivery traces: one span per event written to a connection, as a child of
//! the publisher's trace when the event carries one.
//!
//! The sampling decision is taken here, before any span exists, so an event
//! that is not traced costs one branch and no allocation:
//! - the publisher's decision is followed when it sent a `traceparent`
//!   (parent-based: its sampled flag);
//! - otherwise `telemetry.sample_ratio` of deliveries start a root trace.
//!
//! Spans use the [`TRACE_TARGET`] target, the only one the OTLP layer of
//! `herald-telemetry` exports. Nothing is traced when no exporter is configured.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use herald_config::{Settings, UserIdInTraces};
use herald_protocol::{Target, TraceParent};
use herald_telemetry::TRACE_TARGET;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::bus::Event;

/// Decides which deliveries are traced and records their spans.
pub(crate) struct Tracing {
    enabled: bool,
    ratio: f64,
    user_id: UserIdInTraces,
    /// Keys hashed user ids (see `user_id_key`).
    user_key: [u8; 32],
    node_id: String,
}

impl std::fmt::Debug for Tracing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The user-id key stays out of every printout.
        f.debug_struct("Tracing")
            .field("enabled", &self.enabled)
            .field("ratio", &self.ratio)
            .field("user_id", &self.user_id)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// What is known about one delivery when it is written.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Delivery<'a> {
    /// The event.
    pub(crate) event: &'a Event,
    /// The connection it was written to.
    pub(crate) connection: u64,
    /// The connection's user.
    pub(crate) user: &'a Target,
    /// Whether it came from a replay rather than the live path.
    pub(crate) replayed: bool,
    /// Time the event waited in the connection's queue.
    pub(crate) queued: Duration,
}

impl Tracing {
    /// Tracing as configured; enabled only when an OTLP endpoint is set.
    pub(crate) fn new(settings: &Settings, node_id: &str) -> Self {
        let telemetry = &settings.telemetry;
        let enabled = telemetry.otlp_endpoint.is_some()
            || std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").is_ok_and(|v| !v.is_empty());
        Tracing {
            enabled,
            ratio: telemetry.sample_ratio,
            user_id: telemetry.user_id,
            user_key: user_id_key(settings),
            node_id: node_id.to_owned(),
        }
    }

    /// Whether this event's deliveries are traced.
    pub(crate) fn should_trace(&self, trace: Option<&TraceParent>) -> bool {
        if !self.enabled {
            return false;
        }
        match trace {
            Some(parent) => parent.is_sampled(),
            None => self.ratio > 0.0 && fastrand::f64() < self.ratio,
        }
    }

    /// Records the span of one delivery, if it is sampled.
    pub(crate) fn delivered(&self, delivery: Delivery<'_>) {
        let event = delivery.event;
        if !self.should_trace(event.trace.as_ref()) {
            return;
        }
        let since_publish = SystemTime::now()
            .duration_since(event.published_at)
            .unwrap_or_default();
        let span = tracing::info_span!(
            target: TRACE_TARGET,
            "herald.deliver",
            otel.kind = "consumer",
            herald.node = %self.node_id,
            herald.seq = as_i64(event.id.seq),
            herald.event_id = %event.id,
            herald.target_kind = event.target.kind().as_str(),
            herald.event_type = event.event_type.as_ref().map_or("message", |t| t.as_str()),
            herald.connection = as_i64(delivery.connection),
            herald.replayed = delivery.replayed,
            herald.bytes = as_i64(event.frame.len() as u64),
            herald.publish_to_write_ms = since_publish.as_secs_f64() * 1000.0,
            herald.queue_ms = delivery.queued.as_secs_f64() * 1000.0,
            herald.user = tracing::field::Empty,
        );
        if let Some(user) = self.user_label(delivery.user) {
            span.record("herald.user", user.as_str());
        }
        if let Some(parent) = &event.trace {
            let _ = span.set_parent(parent_context(parent));
        }
    }

    /// The user id for logs, in the form chosen for traces (`-` when omitted).
    pub(crate) fn user_for_logs(&self, user: &Target) -> String {
        self.user_label(user).unwrap_or_else(|| "-".to_owned())
    }

    /// Records a `herald.stream.open` span (sampled by ratio).
    pub(crate) fn stream_opened(
        &self,
        connection: u64,
        user: &Target,
        topics: usize,
        resumed: bool,
    ) {
        if !self.should_trace(None) {
            return;
        }
        let span = tracing::info_span!(
            target: TRACE_TARGET,
            "herald.stream.open",
            herald.node = %self.node_id,
            herald.connection = as_i64(connection),
            herald.topics = as_i64(topics as u64),
            herald.resumed = resumed,
            herald.user = tracing::field::Empty,
        );
        if let Some(user) = self.user_label(user) {
            span.record("herald.user", user.as_str());
        }
    }

    /// Records a `herald.stream.close` span (sampled by ratio).
    pub(crate) fn stream_closed(
        &self,
        connection: u64,
        user: &Target,
        reason: &str,
        open_for: Duration,
    ) {
        if !self.should_trace(None) {
            return;
        }
        let span = tracing::info_span!(
            target: TRACE_TARGET,
            "herald.stream.close",
            herald.node = %self.node_id,
            herald.connection = as_i64(connection),
            herald.reason = reason,
            herald.open_ms = open_for.as_secs_f64() * 1000.0,
            herald.user = tracing::field::Empty,
        );
        if let Some(user) = self.user_label(user) {
            span.record("herald.user", user.as_str());
        }
    }

    /// Records a `herald.replay` span (sampled by ratio): how many events a
    /// resuming stream was sent, or why it was reset.
    pub(crate) fn replayed(&self, connection: u64, events: usize, outcome: &str, took: Duration) {
        if !self.should_trace(None) {
            return;
        }
        let _span = tracing::info_span!(
            target: TRACE_TARGET,
            "herald.replay",
            herald.node = %self.node_id,
            herald.connection = as_i64(connection),
            herald.events = as_i64(events as u64),
            herald.outcome = outcome,
            herald.replay_ms = took.as_secs_f64() * 1000.0,
        );
    }

    /// Records a `herald.gap_repair` span (sampled by ratio): live messages
    /// that were lost and read back from the stream.
    pub(crate) fn gap_repaired(&self, subject: &str, after: u64, events: usize) {
        if !self.should_trace(None) {
            return;
        }
        let _span = tracing::info_span!(
            target: TRACE_TARGET,
            "herald.gap_repair",
            herald.node = %self.node_id,
            herald.subject_kind = if subject.contains(".user.") { "user" } else { "topic" },
            herald.after_seq = as_i64(after),
            herald.events = as_i64(events as u64),
        );
    }

    /// The user id as the operator chose to show it.
    fn user_label(&self, user: &Target) -> Option<String> {
        match self.user_id {
            UserIdInTraces::Raw => Some(user.name().to_owned()),
            UserIdInTraces::Hashed => Some(keyed_hash(&self.user_key, user.name().as_bytes())),
            UserIdInTraces::Omitted => None,
        }
    }
}

/// OTLP integers are signed; `tracing-opentelemetry` would turn a `u64` into text.
fn as_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// The OpenTelemetry context of the publisher's span.
fn parent_context(parent: &TraceParent) -> opentelemetry::Context {
    let mut carrier = HashMap::with_capacity(2);
    carrier.insert("traceparent".to_owned(), parent.traceparent().to_owned());
    if let Some(state) = parent.tracestate() {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    TraceContextPropagator::new().extract(&carrier)
}

/// The key of hashed user ids: `telemetry.user_id_key`, else derived from
/// the gossip key, else from the HS256 secret (each one per deployment, so
/// every node hashes alike), else drawn at start-up.
fn user_id_key(settings: &Settings) -> [u8; 32] {
    let configured = settings
        .telemetry
        .user_id_key
        .as_ref()
        .or(settings.gossip.secret.as_ref())
        .or(settings.auth.hs256_secret.as_ref());
    match configured {
        // A key of its own for this use, whatever the secret is also for.
        Some(secret) => hmac_sha256(secret.expose().as_bytes(), b"herald user id key v1"),
        None => {
            tracing::warn!(
                "no telemetry.user_id_key (nor gossip or HS256 secret): hashed user ids use a key drawn at start-up, so they differ between nodes and restarts"
            );
            let mut key = [0u8; 32];
            chacha20poly1305::aead::rand_core::RngCore::fill_bytes(
                &mut chacha20poly1305::aead::OsRng,
                &mut key,
            );
            key
        }
    }
}

/// A user id keyed with the deployment's key (HMAC-SHA256, 64 bits shown):
/// stable within the deployment, and without the key no guess can be
/// checked against it.
fn keyed_hash(key: &[u8; 32], user: &[u8]) -> String {
    let digest = hmac_sha256(key, user);
    digest[..8]
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use hmac::Mac;
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracing(ratio: f64, enabled: bool) -> Tracing {
        Tracing {
            enabled,
            ratio,
            user_id: UserIdInTraces::Hashed,
            user_key: [7; 32],
            node_id: "n".into(),
        }
    }

    fn parent(flags: &str) -> TraceParent {
        TraceParent::parse(
            &format!("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-{flags}"),
            None,
        )
        .expect("valid")
    }

    #[test]
    fn the_publishers_sampling_decision_is_followed() {
        let t = tracing(0.0, true);
        assert!(t.should_trace(Some(&parent("01"))));
        assert!(!tracing(1.0, true).should_trace(Some(&parent("00"))));
    }

    #[test]
    fn root_deliveries_follow_the_ratio_and_nothing_is_traced_without_an_exporter() {
        assert!(tracing(1.0, true).should_trace(None));
        assert!(!tracing(0.0, true).should_trace(None));
        assert!(!tracing(1.0, false).should_trace(Some(&parent("01"))));
        let half = tracing(0.5, true);
        let traced = (0..10_000).filter(|_| half.should_trace(None)).count();
        assert!((4_000..6_000).contains(&traced), "{traced}");
    }

    /// The label docs/observability.md tells operators how to compute
    /// (`python3 -c 'import hmac,…'` with the HS256 secret as the key source).
    #[test]
    fn a_hashed_user_id_is_the_documented_hmac() {
        let mut settings = Settings::default();
        settings.auth.hs256_secret = Some(herald_config::Secret::new(
            "herald-dev-secret-change-me-0123456789",
        ));
        let key = user_id_key(&settings);
        assert_eq!(keyed_hash(&key, b"alice"), "f169dfb67a7719aa");
        settings.telemetry.user_id_key = Some(herald_config::Secret::new("a key of its own, 16+"));
        assert_ne!(
            user_id_key(&settings),
            key,
            "telemetry.user_id_key comes first"
        );
    }

    #[test]
    fn user_ids_are_hashed_with_the_deployments_key_or_omitted() {
        let alice = Target::user("alice").expect("valid");
        let hashed = tracing(1.0, true).user_label(&alice).expect("hashed");
        assert_eq!(hashed.len(), 16);
        assert_eq!(
            Some(hashed.clone()),
            tracing(1.0, true).user_label(&alice),
            "stable"
        );
        assert_ne!(hashed, "alice");
        let other_deployment = Tracing {
            user_key: [8; 32],
            ..tracing(1.0, true)
        };
        assert_ne!(
            other_deployment.user_label(&alice),
            Some(hashed),
            "another key, another pseudonym: no dictionary of ids matches without the key"
        );
        let omitted = Tracing {
            user_id: UserIdInTraces::Omitted,
            ..tracing(1.0, true)
        };
        assert_eq!(omitted.user_label(&alice), None);
    }
}
