//! Publisher idempotency keys (`msg_id`), validated before they reach a header.
//!
//! A `msg_id` names one logical event for its publisher: a retry with the same
//! key inside the duplicate window is recognised and stored once. The key ends
//! up in a NATS header (`Nats-Msg-Id`, directly or as a digest), in logs and in
//! the memory bus's dedup table, so [`MsgId`] admits only what every one of them
//! carries unchanged: 1 to [`MAX_MSG_ID_BYTES`] bytes of UTF-8, no control
//! character (CR and LF would break a NATS header line and panic the client
//! that builds it), no leading or trailing whitespace (NATS trims header
//! values, so `" a"` would silently become `"a"`).

use std::fmt;

/// The longest `msg_id` accepted, in bytes of UTF-8.
pub const MAX_MSG_ID_BYTES: usize = 256;

/// A validated idempotency key. See the [module documentation](self).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MsgId(String);

/// Why a `msg_id` was refused. Validation changes no state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MsgIdError {
    /// The empty string.
    #[error("msg_id is empty")]
    Empty,
    /// Longer than [`MAX_MSG_ID_BYTES`].
    #[error("msg_id is {len} bytes long; the limit is {MAX_MSG_ID_BYTES}")]
    TooLong {
        /// The key's length in bytes.
        len: usize,
    },
    /// Contains CR, LF, NUL, DEL or another control character.
    #[error("msg_id contains a control character (such as a line break)")]
    ControlCharacter,
    /// Starts or ends with whitespace, which a NATS header does not keep.
    #[error("msg_id starts or ends with whitespace")]
    SurroundingWhitespace,
}

impl MsgId {
    /// Validates a publisher's idempotency key.
    pub fn new(value: impl Into<String>) -> Result<Self, MsgIdError> {
        let value = value.into();
        if value.is_empty() {
            return Err(MsgIdError::Empty);
        }
        if value.len() > MAX_MSG_ID_BYTES {
            return Err(MsgIdError::TooLong { len: value.len() });
        }
        if value.chars().any(char::is_control) {
            return Err(MsgIdError::ControlCharacter);
        }
        if value.trim() != value {
            return Err(MsgIdError::SurroundingWhitespace);
        }
        Ok(MsgId(value))
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for MsgId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_header_injection_attempt_is_refused_as_a_control_character() {
        for bad in [
            "m0\r\nX-Injected: 1",
            "a\nb",
            "a\rb",
            "nul\0",
            "del\u{7f}",
            "c1\u{85}",
        ] {
            assert_eq!(
                MsgId::new(bad),
                Err(MsgIdError::ControlCharacter),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn empty_overlong_and_space_padded_keys_are_refused() {
        assert_eq!(MsgId::new(""), Err(MsgIdError::Empty));
        assert_eq!(
            MsgId::new("x".repeat(MAX_MSG_ID_BYTES + 1)),
            Err(MsgIdError::TooLong {
                len: MAX_MSG_ID_BYTES + 1
            })
        );
        for padded in [" a", "a ", "\u{3000}a"] {
            assert_eq!(MsgId::new(padded), Err(MsgIdError::SurroundingWhitespace));
        }
    }

    #[test]
    fn ordinary_keys_are_kept_as_given() {
        for good in [
            "order-42",
            "greet 1",
            "é-日本",
            &"x".repeat(MAX_MSG_ID_BYTES),
        ] {
            assert_eq!(
                MsgId::new(good).map(|id| id.to_string()),
                Ok(good.to_owned())
            );
        }
    }

    proptest! {
        /// Whatever is accepted survives a NATS header unchanged: no CR or LF
        /// (the client would panic) and nothing its parser trims.
        #[test]
        fn every_accepted_key_is_a_faithful_nats_header_value(value in any::<String>()) {
            if let Ok(id) = MsgId::new(value.clone()) {
                prop_assert!(!id.as_str().contains(['\r', '\n']));
                prop_assert_eq!(id.as_str().trim(), value.as_str());
                prop_assert!(!value.is_empty() && value.len() <= MAX_MSG_ID_BYTES);
            }
        }
    }
}
