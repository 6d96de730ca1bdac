//! chitchat's wire format for the messages whose body chitchat's public API
//! can encode: `Ack` (a delta) and `BadCluster` (nothing). The transport
//! encodes and decodes these itself instead of passing them through the
//! loopback codec socket, saving two system calls per datagram each way.
//!
//! chitchat 0.13 keeps `ChitchatEnvelope::{serialize, deserialize}` private
//! but exports the `Serializable`/`Deserializable` traits, which its delta
//! type implements; only the digest (in `Syn` and `SynAck`) has no public
//! encoder, so those still take the codec socket. The header mirrors
//! chitchat's `message_serialize.rs`:
//!
//! ```text
//! | magic u16 LE (45139) | protocol version u8 | message type u8 | body ...
//! ```
//!
//! A unit test in [`super`] holds both directions byte for byte to what
//! chitchat's own socket produces and decodes, so a change of format in a
//! chitchat upgrade fails the build's tests rather than splitting a cluster.

use chitchat::{ChitchatEnvelope, ChitchatMessage, Deserializable, ProtocolVersion, Serializable};

/// First two bytes of every chitchat datagram (little-endian).
const MAGIC: u16 = 45_139;
/// chitchat's message type codes.
const ACK: u8 = 2;
const BAD_CLUSTER: u8 = 3;

/// A delta that chitchat's decoder refuses. The datagram was authentic (it
/// opened with a cluster key), so a peer runs an incompatible chitchat; it is
/// dropped, as chitchat's own socket drops a payload it cannot decode.
#[derive(Debug, thiserror::Error)]
#[error("invalid chitchat delta in an Ack")]
pub(super) struct InvalidDelta(#[source] anyhow::Error);

/// What [`decode`] made of a datagram.
pub(super) enum Decoded {
    /// An `Ack` or `BadCluster`, decoded here.
    Envelope(ChitchatEnvelope),
    /// Anything else (`Syn`, `SynAck`, or bytes that are not chitchat's):
    /// chitchat's codec socket decodes it or logs why not.
    NeedsCodec,
    /// An `Ack` whose delta does not decode.
    Invalid(InvalidDelta),
}

/// Writes `envelope` into `buf` (cleared first) exactly as chitchat's socket
/// would, if its message is one this module encodes; returns whether it did
/// (`false`: `buf` is untouched and the codec socket must encode it).
pub(super) fn encode(envelope: &ChitchatEnvelope, buf: &mut Vec<u8>) -> bool {
    let (message_type, delta) = match &envelope.message {
        ChitchatMessage::Ack { delta } => (ACK, Some(delta)),
        ChitchatMessage::BadCluster => (BAD_CLUSTER, None),
        ChitchatMessage::Syn { .. } | ChitchatMessage::SynAck { .. } => return false,
    };
    buf.clear();
    buf.extend_from_slice(&MAGIC.to_le_bytes());
    buf.push(envelope.version.to_code());
    buf.push(message_type);
    if let Some(delta) = delta {
        Serializable::serialize(delta, buf);
    }
    true
}

/// Decodes `datagram` if it is an `Ack` or a `BadCluster`, as chitchat's
/// socket would (bytes after the message are ignored, as chitchat does).
pub(super) fn decode(datagram: &[u8]) -> Decoded {
    let [magic_low, magic_high, version, message_type, body @ ..] = datagram else {
        return Decoded::NeedsCodec;
    };
    let mut body = body;
    if u16::from_le_bytes([*magic_low, *magic_high]) != MAGIC {
        return Decoded::NeedsCodec;
    }
    let Some(version) = ProtocolVersion::from_code(*version) else {
        return Decoded::NeedsCodec;
    };
    let message = match *message_type {
        // The delta's type is private to chitchat; the field names it.
        ACK => match Deserializable::deserialize(&mut body) {
            Ok(delta) => ChitchatMessage::Ack { delta },
            Err(err) => return Decoded::Invalid(InvalidDelta(err)),
        },
        BAD_CLUSTER => ChitchatMessage::BadCluster,
        _ => return Decoded::NeedsCodec,
    };
    Decoded::Envelope(ChitchatEnvelope { version, message })
}
