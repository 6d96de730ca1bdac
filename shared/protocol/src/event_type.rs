//! SSE event types (the `event:` field), validated so they cannot break framing.

use std::fmt;

/// The longest event type accepted, in bytes.
pub const MAX_EVENT_TYPE_BYTES: usize = 128;

/// Event types starting with this prefix, in any letter case, are Herald's own
/// (`herald.reset`, ...); publishers may not use them. Case is ignored so that
/// `HERALD.reset` cannot pass for a system event in a client that compares
/// names case-insensitively.
pub const RESERVED_PREFIX: &str = "herald.";

/// A validated SSE event type: non-empty, at most [`MAX_EVENT_TYPE_BYTES`], no
/// control characters (so no CR or LF can reach the framing or a NATS header)
/// and no leading or trailing whitespace (the `Herald-Event` header carries it
/// on NATS, and NATS trims header values, so it would not arrive as sent).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EventType(String);

/// Why an event type was refused. Validation changes no state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventTypeError {
    /// Empty string.
    #[error("event type is empty")]
    Empty,
    /// Longer than [`MAX_EVENT_TYPE_BYTES`].
    #[error("event type is longer than {MAX_EVENT_TYPE_BYTES} bytes")]
    TooLong,
    /// Contains CR, LF, NUL or another control character.
    #[error("event type contains a control character (such as a line break)")]
    ControlCharacter,
    /// Starts or ends with whitespace, which the NATS header does not keep.
    #[error("event type starts or ends with whitespace")]
    SurroundingWhitespace,
    /// Starts with the reserved `herald.` prefix (in any letter case).
    #[error("event types starting with \"herald.\" (in any letter case) are reserved")]
    Reserved,
}

impl EventType {
    /// Validates an event type coming from a publisher (reserved prefix refused).
    pub fn new(value: impl Into<String>) -> Result<Self, EventTypeError> {
        let value = value.into();
        Self::check(&value)?;
        if is_reserved(&value) {
            return Err(EventTypeError::Reserved);
        }
        Ok(EventType(value))
    }

    /// An event type of Herald's own (`herald.*`), for system events.
    pub fn system(name: &'static str) -> Self {
        debug_assert!(Self::check(name).is_ok() && is_reserved(name));
        EventType(name.to_owned())
    }

    fn check(value: &str) -> Result<(), EventTypeError> {
        if value.is_empty() {
            return Err(EventTypeError::Empty);
        }
        if value.len() > MAX_EVENT_TYPE_BYTES {
            return Err(EventTypeError::TooLong);
        }
        if value.chars().any(char::is_control) {
            return Err(EventTypeError::ControlCharacter);
        }
        if value.trim() != value {
            return Err(EventTypeError::SurroundingWhitespace);
        }
        Ok(())
    }

    /// The event type as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Whether `value` starts with [`RESERVED_PREFIX`], ignoring ASCII letter case.
fn is_reserved(value: &str) -> bool {
    value
        .get(..RESERVED_PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(RESERVED_PREFIX))
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_breaks_in_event_types_are_refused() {
        for bad in ["a\nb", "a\rb", "x\r\ndata: evil", "nul\0"] {
            assert_eq!(EventType::new(bad), Err(EventTypeError::ControlCharacter));
        }
    }

    #[test]
    fn the_herald_prefix_is_reserved_for_the_server_in_any_letter_case() {
        for reserved in ["herald.reset", "HERALD.reset", "Herald.x", "hErAlD."] {
            assert_eq!(
                EventType::new(reserved),
                Err(EventTypeError::Reserved),
                "{reserved}"
            );
        }
        assert_eq!(EventType::system("herald.reset").as_str(), "herald.reset");
        // Only the prefix with its dot is reserved.
        assert!(EventType::new("heraldry").is_ok());
        assert!(EventType::new("my.herald.x").is_ok());
    }

    #[test]
    fn space_padded_event_types_are_refused_because_nats_would_trim_them() {
        for padded in [" a", "a ", "\u{a0}a", "a\u{2003}"] {
            assert_eq!(
                EventType::new(padded),
                Err(EventTypeError::SurroundingWhitespace),
                "{padded:?}"
            );
        }
        assert!(EventType::new("two words").is_ok());
    }

    #[test]
    fn ordinary_names_are_accepted() {
        assert_eq!(
            EventType::new("user-update").map(|t| t.to_string()),
            Ok("user-update".to_owned())
        );
        assert_eq!(EventType::new(""), Err(EventTypeError::Empty));
        assert_eq!(
            EventType::new("x".repeat(MAX_EVENT_TYPE_BYTES + 1)),
            Err(EventTypeError::TooLong)
        );
    }
}
