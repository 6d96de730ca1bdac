//! Publish deduplication keys, scoped to their publisher and target.
//!
//! A bus deduplicates by one flat key shared by everyone who writes to it
//! (`Nats-Msg-Id` in the JetStream stream, the memory bus's table). Handing it
//! a client's `msg_id` as is let one publisher suppress another's event by
//! reusing its id, and learn that event's SSE id from the `duplicate: true`
//! answer. So `POST /v1/publish` hands the bus [`dedup_key`] instead: a
//! fixed-length digest of the publisher's id, the target and the `msg_id`.
//! A retry by the same publisher to the same target maps to the same key; any
//! other publisher or target maps elsewhere. The bus code needs no change and
//! the header length is fixed (64 hex digits) whatever the `msg_id`.
//!
//! The digest needs no secret: a publisher chooses only the `msg_id`, never
//! the other inputs, so knowing how keys are built gives it no way to reach
//! another publisher's key. Publishers writing to NATS directly choose their
//! `Nats-Msg-Id` themselves; docs/publishing.md says how they scope it.

use herald_protocol::{MsgId, Target};

use sha2::{Digest, Sha256};

use crate::auth::{PublisherId, lower_hex};

/// Names this derivation, so a change to it yields keys that cannot match the
/// old ones (a retry across an upgrade is then stored twice rather than
/// matched against a different key's event).
const DOMAIN: &str = "herald publish dedup v1";

/// The bus dedup key for `msg_id` sent by `publisher` to `target`: lower-case
/// hex SHA-256 (64 characters) over every input, each length-prefixed so no
/// two different inputs run together into the same bytes.
pub(crate) fn dedup_key(publisher: &PublisherId, target: &Target, msg_id: &MsgId) -> String {
    let (publisher_kind, publisher_name) = match publisher {
        PublisherId::Subject(sub) => ("sub", sub.as_str()),
        PublisherId::Token(digest) => ("token", digest.as_str()),
    };
    // Fed to the digest field by field: the same bytes as one buffer, without
    // building it.
    let mut digest = Sha256::new();
    for field in [
        DOMAIN,
        publisher_kind,
        publisher_name,
        target.kind().as_str(),
        target.name(),
        msg_id.as_str(),
    ] {
        digest.update((field.len() as u64).to_be_bytes());
        digest.update(field.as_bytes());
    }
    lower_hex(&digest.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(publisher: &PublisherId, target: &Target, msg_id: &str) -> String {
        dedup_key(
            publisher,
            target,
            &MsgId::new(msg_id).expect("valid msg_id"),
        )
    }

    fn sub(name: &str) -> PublisherId {
        PublisherId::Subject(name.into())
    }

    fn user(name: &str) -> Target {
        Target::user(name).expect("valid user")
    }

    #[test]
    fn the_same_publisher_target_and_msg_id_always_give_the_same_key() {
        let first = key(&sub("billing"), &user("alice"), "order-42");
        assert_eq!(first, key(&sub("billing"), &user("alice"), "order-42"));
        assert_eq!(first.len(), 64);
        assert!(first.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn the_key_is_the_documented_digest_and_stays_the_same_across_versions() {
        // SHA-256 over the length-prefixed fields, computed apart (Python's
        // hashlib): a retry across an upgrade must still find its key.
        assert_eq!(
            key(&sub("billing"), &user("alice"), "order-42"),
            "39f29fbfac85a75b8c58b6a3f29c2716d91f73acd2d3816b5ca10f2a594fc316"
        );
    }

    #[test]
    fn another_publisher_or_target_never_shares_a_key() {
        let original = key(&sub("billing"), &user("alice"), "order-42");
        assert_ne!(original, key(&sub("mallory"), &user("alice"), "order-42"));
        assert_ne!(original, key(&sub("billing"), &user("bob"), "order-42"));
        assert_ne!(
            original,
            key(
                &sub("billing"),
                &Target::topic("alice").expect("valid"),
                "order-42"
            )
        );
        assert_ne!(
            original,
            key(
                &PublisherId::Token("billing".into()),
                &user("alice"),
                "order-42"
            )
        );
    }

    #[test]
    fn fields_cannot_be_shifted_into_each_other() {
        // Without length prefixes "ab" + "c" and "a" + "bc" would hash alike.
        assert_ne!(
            key(&sub("ab"), &user("c"), "m"),
            key(&sub("a"), &user("bc"), "m")
        );
        assert_ne!(
            key(&sub("a"), &user("b"), "c-m"),
            key(&sub("a"), &user("b-c"), "m")
        );
    }
}
