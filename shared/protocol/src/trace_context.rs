//! W3C Trace Context carried with an event, from the publisher to the delivery.
//!
//! Publishers send `traceparent` (and optionally `tracestate`) as NATS headers
//! or HTTP request headers. Herald keeps them with the event so the span of
//! each delivery can be a child of the publisher's span. Only a well-formed
//! `traceparent` (version `00`, non-zero ids) is kept; anything else is dropped
//! and the delivery starts a root trace.

/// The longest `tracestate` kept, bytes (the W3C limit is 512).
const MAX_TRACESTATE_BYTES: usize = 512;

/// A validated W3C trace context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    traceparent: Box<str>,
    tracestate: Option<Box<str>>,
    sampled: bool,
}

impl TraceParent {
    /// Parses a `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`), with an
    /// optional `tracestate`. Returns `None` when it is not well formed.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let (version, trace_id, span_id, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if parts.next().is_some()
            || version != "00"
            || !hex(trace_id, 32)
            || !hex(span_id, 16)
            || !hex(flags, 2)
            || trace_id.bytes().all(|b| b == b'0')
            || span_id.bytes().all(|b| b == b'0')
        {
            return None;
        }
        let sampled = u8::from_str_radix(flags, 16).ok()? & 1 == 1;
        // Printable ASCII only (tabs allowed, as W3C list separators may be):
        // the value is written into a NATS header, where CR or LF would panic
        // the client and any other control character has no business.
        let tracestate = tracestate
            .map(str::trim)
            .filter(|s| {
                !s.is_empty()
                    && s.len() <= MAX_TRACESTATE_BYTES
                    && s.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b))
            })
            .map(Into::into);
        Some(TraceParent {
            traceparent: traceparent.trim().into(),
            tracestate,
            sampled,
        })
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The `tracestate` header value, if any.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// Whether the publisher sampled this trace (flag `01`).
    pub fn is_sampled(&self) -> bool {
        self.sampled
    }

    /// The 32-hex-digit trace id.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_well_formed_traceparent_is_kept_with_its_sampled_flag() {
        let tp = TraceParent::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("vendor=x"),
        )
        .expect("valid");
        assert!(tp.is_sampled());
        assert_eq!(tp.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(tp.tracestate(), Some("vendor=x"));
        let unsampled = TraceParent::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            None,
        )
        .expect("valid");
        assert!(!unsampled.is_sampled());
    }

    #[test]
    fn a_tracestate_with_line_breaks_or_other_controls_is_dropped_not_forwarded() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for bad in [
            "a=1\r\nX-Injected: 1",
            "a=1\nb=2",
            "a=\u{1}",
            "a=\u{7f}",
            "a=é",
        ] {
            let tp = TraceParent::parse(parent, Some(bad)).expect("traceparent kept");
            assert_eq!(tp.tracestate(), None, "{bad:?}");
        }
        let tp = TraceParent::parse(parent, Some("a=1,\tb=2")).expect("valid");
        assert_eq!(tp.tracestate(), Some("a=1,\tb=2"));
    }

    #[test]
    fn malformed_traceparents_are_dropped() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-xyz-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceParent::parse(bad, None), None, "{bad:?}");
        }
    }
}
