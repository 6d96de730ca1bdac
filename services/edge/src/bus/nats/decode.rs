//! Turning a stored or republished message into an [`Event`], or refusing it.
//!
//! Anything on the stream can be foreign: a subject that is not a Herald
//! target, a payload over `nats.max_event_bytes` or not UTF-8, an event-type
//! header SSE cannot carry. Such a message is counted in
//! `herald_bus_bad_events_total` and logged with its subject and sequence,
//! wherever it was read (live, replay, gap fill); the caller still moves its
//! target's chain past it, so one bad message never blocks the events after it.

use std::sync::Arc;
use std::time::SystemTime;

use async_nats::HeaderMap;
use herald_protocol::{EventId, EventType, Target, TraceParent};

use crate::bus::Event;
use crate::metrics::Metrics;

/// Header carrying the SSE event type.
pub(crate) const EVENT_TYPE_HEADER: &str = "Herald-Event";

/// Validates messages into events.
#[derive(Debug)]
pub(super) struct Decoder {
    subject_prefix: String,
    max_event_bytes: usize,
    metrics: Arc<Metrics>,
}

impl Decoder {
    pub(super) fn new(
        subject_prefix: String,
        max_event_bytes: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        Decoder {
            subject_prefix,
            max_event_bytes,
            metrics,
        }
    }

    /// The subject `target`'s events are stored under.
    pub(super) fn stored_subject(&self, target: &Target) -> String {
        target.subject(&self.subject_prefix)
    }

    /// The event stored as `id` on `subject`, or `None` (counted and logged)
    /// when it cannot be delivered.
    pub(super) fn decode(
        &self,
        subject: &str,
        id: EventId,
        headers: Option<&HeaderMap>,
        payload: &[u8],
        stored_at: SystemTime,
    ) -> Option<Event> {
        let Ok(target) = Target::from_subject(&self.subject_prefix, subject) else {
            self.refused(
                subject,
                id.seq,
                "subject does not decode to a user or topic",
            );
            return None;
        };
        self.decode_for(target, subject, id, headers, payload, stored_at)
    }

    /// The event of `target` stored as `id` on `subject` (a live copy: its
    /// subject was routed to `target` already), as [`Decoder::decode`].
    pub(super) fn decode_for(
        &self,
        target: Target,
        subject: &str,
        id: EventId,
        headers: Option<&HeaderMap>,
        payload: &[u8],
        stored_at: SystemTime,
    ) -> Option<Event> {
        let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
        let refuse = |reason: &str| {
            self.refused(subject, id.seq, reason);
            None
        };
        if payload.len() > self.max_event_bytes {
            return refuse("payload larger than nats.max_event_bytes");
        }
        let Ok(data) = std::str::from_utf8(payload) else {
            return refuse("payload is not UTF-8");
        };
        let event_type = match header(EVENT_TYPE_HEADER) {
            None => None,
            Some(value) => match EventType::new(value) {
                Ok(event_type) => Some(event_type),
                Err(_) => return refuse("invalid Herald-Event header"),
            },
        };
        let trace =
            header("traceparent").and_then(|tp| TraceParent::parse(tp, header("tracestate")));
        Some(Event::new(id, target, event_type, data, stored_at).with_trace(trace))
    }

    /// Counts and logs a message that cannot be delivered.
    pub(super) fn refused(&self, subject: &str, seq: u64, reason: &str) {
        self.metrics.bus_bad_events.inc();
        tracing::warn!(%subject, seq, reason, "dropping an event that cannot be delivered");
    }
}
