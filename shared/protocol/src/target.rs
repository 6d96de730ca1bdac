//! Targets (users and topics) and their NATS subject tokens.
//!
//! Every event is addressed to one [`Target`]. On NATS a target becomes the
//! subject `<prefix>.user.<token>` or `<prefix>.topic.<token>`, where `<token>` is
//! the name encoded by [`Target::token`]:
//!
//! - a *plain* name, made only of `[A-Za-z0-9_-]`, is its own token;
//! - any other name is `~` followed by the unpadded base64url (RFC 4648 §5)
//!   encoding of its UTF-8 bytes.
//!
//! The base64url alphabet is the plain alphabet, so a token never contains `.`,
//! `*`, `>`, whitespace or any other character that could change which subject is
//! used. The encoding is injective: a plain name never starts with `~`, and
//! [`Target::from_token`] refuses a `~` token that decodes to a plain name (that
//! name has only one spelling). This is a security boundary: user ids are
//! attacker-influenced, and a wildcard in a subject would read other users' events.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The longest user id or topic name accepted, in bytes of UTF-8.
///
/// Bounded so that a subject always fits comfortably in a NATS control line.
pub const MAX_NAME_BYTES: usize = 256;

/// Marks a token as base64url-encoded; never part of a plain name.
const ENCODED_MARK: char = '~';

/// Whether a target is a user (private stream) or a topic (shared stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TargetKind {
    /// A user's private events; only a token whose `sub` is that user reads them.
    User,
    /// A named topic; any token whose `topics` claim grants it reads it.
    Topic,
}

impl TargetKind {
    /// The subject segment for this kind (`user` or `topic`).
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::User => "user",
            TargetKind::Topic => "topic",
        }
    }
}

/// The recipient of an event: one user or one topic.
///
/// Cloning one shares its name (a node keeps a target in several places per
/// open stream, and one per live event).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    kind: TargetKind,
    name: Arc<str>,
}

/// Why a name or subject token is not a valid target. No state is changed by
/// any operation that returns it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The name is empty.
    #[error("{0} name is empty")]
    Empty(&'static str),
    /// The name is longer than [`MAX_NAME_BYTES`].
    #[error("{kind} name is {len} bytes long; the limit is {MAX_NAME_BYTES}")]
    TooLong {
        /// `user` or `topic`.
        kind: &'static str,
        /// The name's length in bytes.
        len: usize,
    },
    /// The name contains a control character (line breaks, NUL, ...).
    #[error("{0} name contains a control character")]
    ControlCharacter(&'static str),
    /// A subject token is not a valid encoding of any name.
    #[error("subject token is not a valid herald encoding")]
    BadToken,
}

impl Target {
    /// A user target, after validating the id.
    pub fn user(name: impl AsRef<str>) -> Result<Self, TargetError> {
        Self::new(TargetKind::User, name.as_ref())
    }

    /// A topic target, after validating the name.
    pub fn topic(name: impl AsRef<str>) -> Result<Self, TargetError> {
        Self::new(TargetKind::Topic, name.as_ref())
    }

    /// A target of the given kind, after validating the name.
    pub fn new(kind: TargetKind, name: &str) -> Result<Self, TargetError> {
        let label = kind.as_str();
        if name.is_empty() {
            return Err(TargetError::Empty(label));
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(TargetError::TooLong {
                kind: label,
                len: name.len(),
            });
        }
        if name.chars().any(char::is_control) {
            return Err(TargetError::ControlCharacter(label));
        }
        Ok(Target {
            kind,
            name: name.into(),
        })
    }

    /// User or topic.
    pub fn kind(&self) -> TargetKind {
        self.kind
    }

    /// The user id or topic name, as given.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The single NATS subject token that stands for this name.
    pub fn token(&self) -> String {
        if is_plain(&self.name) {
            self.name.to_string()
        } else {
            let mut token = String::with_capacity(1 + self.name.len().div_ceil(3) * 4);
            token.push(ENCODED_MARK);
            URL_SAFE_NO_PAD.encode_string(self.name.as_bytes(), &mut token);
            token
        }
    }

    /// Decodes a subject token produced by [`Target::token`].
    pub fn from_token(kind: TargetKind, token: &str) -> Result<Self, TargetError> {
        let name = match token.strip_prefix(ENCODED_MARK) {
            None if is_plain(token) => token.to_owned(),
            None => return Err(TargetError::BadToken),
            Some(encoded) => {
                let bytes = URL_SAFE_NO_PAD
                    .decode(encoded)
                    .map_err(|_| TargetError::BadToken)?;
                let name = String::from_utf8(bytes).map_err(|_| TargetError::BadToken)?;
                if is_plain(&name) {
                    // A plain name has exactly one spelling: itself.
                    return Err(TargetError::BadToken);
                }
                name
            }
        };
        Target::new(kind, &name)
    }

    /// The full NATS subject under `prefix`, e.g. `herald.user.alice`.
    pub fn subject(&self, prefix: &str) -> String {
        format!("{prefix}.{}.{}", self.kind.as_str(), self.token())
    }

    /// Parses a full subject under `prefix` back into a target.
    pub fn from_subject(prefix: &str, subject: &str) -> Result<Self, TargetError> {
        let rest = subject
            .strip_prefix(prefix)
            .and_then(|rest| rest.strip_prefix('.'))
            .ok_or(TargetError::BadToken)?;
        let (kind, token) = rest.split_once('.').ok_or(TargetError::BadToken)?;
        let kind = match kind {
            "user" => TargetKind::User,
            "topic" => TargetKind::Topic,
            _ => return Err(TargetError::BadToken),
        };
        Target::from_token(kind, token)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind.as_str(), self.name)
    }
}

/// Whether `name` is made only of `[A-Za-z0-9_-]` (and is not empty).
fn is_plain(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_names_are_their_own_token() {
        let target = Target::user("alice_01-x").expect("valid");
        assert_eq!(target.token(), "alice_01-x");
        assert_eq!(target.subject("herald"), "herald.user.alice_01-x");
    }

    #[test]
    fn wildcards_and_dots_are_encoded_into_one_safe_token() {
        for name in ["a.b", "*", ">", "a b", "$SYS", "é", "~", "alice.>"] {
            let token = Target::user(name).expect("valid").token();
            assert!(token.starts_with('~'), "{name} -> {token}");
            assert!(!token.contains(['.', '*', '>', ' ']), "{name} -> {token}");
        }
    }

    #[test]
    fn a_plain_name_spelled_in_base64_is_refused() {
        // "alice" has exactly one token; "~YWxpY2U" must not alias it.
        assert_eq!(
            Target::from_token(TargetKind::User, "~YWxpY2U"),
            Err(TargetError::BadToken)
        );
    }

    #[test]
    fn names_with_control_characters_or_too_long_are_refused() {
        assert!(matches!(
            Target::user("a\nb"),
            Err(TargetError::ControlCharacter(_))
        ));
        assert!(matches!(Target::user(""), Err(TargetError::Empty(_))));
        assert!(matches!(
            Target::topic("x".repeat(MAX_NAME_BYTES + 1)),
            Err(TargetError::TooLong { .. })
        ));
    }

    #[test]
    fn subjects_under_another_prefix_or_kind_do_not_decode() {
        assert!(Target::from_subject("herald", "other.user.alice").is_err());
        assert!(Target::from_subject("herald", "herald.admin.alice").is_err());
        assert!(Target::from_subject("herald", "herald.user.a.b").is_err());
        assert_eq!(
            Target::from_subject("herald", "herald.topic.news").expect("valid"),
            Target::topic("news").expect("valid")
        );
    }

    proptest! {
        #[test]
        fn token_round_trips_and_uses_only_the_safe_alphabet(name in "\\PC{1,80}") {
            let target = Target::user(name).expect("printable names are valid");
            let token = target.token();
            prop_assert!(token.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '~'));
            prop_assert_eq!(Target::from_token(TargetKind::User, &token).expect("decodes"), target.clone());
            prop_assert_eq!(Target::from_subject("herald", &target.subject("herald")).expect("decodes"), target);
        }

        #[test]
        fn distinct_names_never_share_a_token(a in "\\PC{1,20}", b in "\\PC{1,20}") {
            prop_assume!(a != b);
            let ta = Target::topic(a).expect("valid").token();
            let tb = Target::topic(b).expect("valid").token();
            prop_assert_ne!(ta, tb);
        }

        #[test]
        fn arbitrary_tokens_never_panic(token in "\\PC{0,40}") {
            let _ = Target::from_token(TargetKind::User, &token);
        }
    }
}
