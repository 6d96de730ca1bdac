//! Where a stream stands in every target it follows: the `id:` Herald writes
//! and reads back as `Last-Event-ID`.
//!
//! A stream follows one or more targets (its user, and topics). Each target's
//! events reach it in that target's sequence order, but two targets' events
//! can reach it in either order (each target is followed on its own). So one
//! sequence cannot say where a multi-target stream stands: after target B's
//! event 10 and before target A's event 9, "10" would resume past A's 9. The
//! id therefore carries every target's position:
//!
//! - `<epoch>-<seq>`: every target stands at `seq`. Single-target streams, and
//!   buses that deliver every target in one global order, write this form
//!   (it is also the event's own [`EventId`]).
//! - `<epoch>-<newest>.<fingerprint>.<lag>.<lag>…`: one lag per target, in the
//!   stream's target order (its user first, then its topics sorted by name):
//!   target `i` stands at `newest - lag_i`. The fingerprint (four hex digits
//!   of a hash of the target list) tells a resume whose target list changed
//!   from one whose positions can be used.
//!
//! A position `p` for a target means: every event of that target up to and
//! including sequence `p` has been written to the stream (or belongs to
//! history from before the stream started). Resuming reads each target's
//! events after its own position, so the id alone is enough to continue
//! exactly, whatever order the targets' events arrived in.

use std::fmt::{self, Write};

use crate::{Epoch, EventId, Target};

/// Every followed target's position in one history (epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamPosition {
    /// The history the positions belong to.
    pub epoch: Epoch,
    /// One sequence per target, in the stream's target order.
    pub seqs: Vec<u64>,
}

/// Why a `Last-Event-ID` value could not be read as a position for a stream's
/// targets. Parsing changes no state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PositionError {
    /// Longer than any id Herald writes for this many targets.
    #[error("event id is too long")]
    TooLong,
    /// Not an id Herald writes.
    #[error("event id is not of the form <epoch>-<sequence>[.<fingerprint>.<lag>…]")]
    Malformed,
    /// The id was written for another list of targets (the stream now
    /// follows other topics): its positions cannot be matched to them.
    #[error("event id was written for another set of targets")]
    TargetsChanged,
}

/// The longest decimal `u64`.
const MAX_DECIMAL: usize = 20;

impl StreamPosition {
    /// Every one of `targets` targets at `id`.
    pub fn at(id: EventId, targets: usize) -> Self {
        StreamPosition {
            epoch: id.epoch,
            seqs: vec![id.seq; targets],
        }
    }

    /// The newest position of any target.
    pub fn newest(&self) -> u64 {
        self.seqs.iter().copied().max().unwrap_or(0)
    }

    /// The lowest position of any target.
    pub fn oldest(&self) -> u64 {
        self.seqs.iter().copied().min().unwrap_or(0)
    }

    /// Reads `value` as a position for `targets` (in the stream's target order).
    pub fn parse(value: &str, targets: &[Target]) -> Result<Self, PositionError> {
        if value.len() > max_len(targets.len()) {
            return Err(PositionError::TooLong);
        }
        let mut parts = value.split('.');
        let head = parts.next().unwrap_or_default();
        let id: EventId = head.parse().map_err(|_| PositionError::Malformed)?;
        let Some(fingerprint) = parts.next() else {
            return Ok(StreamPosition::at(id, targets.len()));
        };
        if fingerprint.len() != 4 || !fingerprint.bytes().all(is_lower_hex) {
            return Err(PositionError::Malformed);
        }
        let lags = parts
            .map(|lag| {
                if lag.is_empty()
                    || lag.len() > MAX_DECIMAL
                    || !lag.bytes().all(|b| b.is_ascii_digit())
                {
                    return Err(PositionError::Malformed);
                }
                let lag: u64 = lag.parse().map_err(|_| PositionError::Malformed)?;
                id.seq.checked_sub(lag).ok_or(PositionError::Malformed)
            })
            .collect::<Result<Vec<u64>, _>>()?;
        if lags.len() < 2 {
            return Err(PositionError::Malformed);
        }
        if lags.len() != targets.len() || fingerprint != format!("{:04x}", fingerprint_of(targets))
        {
            return Err(PositionError::TargetsChanged);
        }
        Ok(StreamPosition {
            epoch: id.epoch,
            seqs: lags,
        })
    }

    /// Writes the id for these positions: the short form when every target
    /// stands at the same sequence, else the form with one lag per target.
    /// `fingerprint` is [`fingerprint_of`] the stream's targets.
    pub fn write(&self, fingerprint: u16, out: &mut impl Write) -> fmt::Result {
        let newest = self.newest();
        write!(out, "{:x}-{newest}", self.epoch.0)?;
        if self.seqs.iter().all(|&seq| seq == newest) {
            return Ok(());
        }
        write!(out, ".{fingerprint:04x}")?;
        for seq in &self.seqs {
            write!(out, ".{}", newest - seq)?;
        }
        Ok(())
    }
}

/// A 16-bit fingerprint of a stream's target list (FNV-1a over the kinds and
/// names, folded). Only tells lists apart; it is not a secret and not a
/// security boundary (the targets are the client's own).
pub fn fingerprint_of(targets: &[Target]) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for &byte in bytes {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    for target in targets {
        feed(target.kind().as_str().as_bytes());
        feed(&[0]);
        feed(target.name().as_bytes());
        feed(&[0]);
    }
    (hash ^ (hash >> 16) ^ (hash >> 32) ^ (hash >> 48)) as u16
}

fn is_lower_hex(byte: u8) -> bool {
    byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)
}

/// The longest id written for `targets` targets.
fn max_len(targets: usize) -> usize {
    16 + 1 + MAX_DECIMAL + 5 + targets * (1 + MAX_DECIMAL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn targets(n: usize) -> Vec<Target> {
        let mut targets = vec![Target::user("alice").expect("valid")];
        for i in 1..n {
            targets.push(Target::topic(format!("room-{i}")).expect("valid"));
        }
        targets
    }

    fn written(position: &StreamPosition, targets: &[Target]) -> String {
        let mut id = String::new();
        position
            .write(fingerprint_of(targets), &mut id)
            .expect("a String takes any text");
        id
    }

    #[test]
    fn a_single_target_stream_writes_the_events_own_id() {
        let position = StreamPosition {
            epoch: Epoch(0x18c3),
            seqs: vec![42],
        };
        assert_eq!(written(&position, &targets(1)), "18c3-42");
    }

    #[test]
    fn targets_at_different_positions_carry_one_lag_each() {
        let targets = targets(3);
        let position = StreamPosition {
            epoch: Epoch(0x18c3),
            seqs: vec![9, 10, 4],
        };
        let id = written(&position, &targets);
        let fingerprint = format!("{:04x}", fingerprint_of(&targets));
        assert_eq!(id, format!("18c3-10.{fingerprint}.1.0.6"));
        assert_eq!(StreamPosition::parse(&id, &targets), Ok(position));
    }

    #[test]
    fn a_short_id_puts_every_target_at_its_sequence() {
        let position = StreamPosition::parse("18c3-42", &targets(3)).expect("parses");
        assert_eq!(position.seqs, vec![42, 42, 42]);
        assert_eq!(position.epoch, Epoch(0x18c3));
    }

    #[test]
    fn an_id_written_for_other_targets_is_recognised_as_such() {
        let position = StreamPosition {
            epoch: Epoch(1),
            seqs: vec![5, 7],
        };
        let id = written(&position, &targets(2));
        let mut other = targets(2);
        other[1] = Target::topic("lobby").expect("valid");
        assert_eq!(
            StreamPosition::parse(&id, &other),
            Err(PositionError::TargetsChanged)
        );
        assert_eq!(
            StreamPosition::parse(&id, &targets(3)),
            Err(PositionError::TargetsChanged)
        );
    }

    #[test]
    fn malformed_positions_are_refused() {
        let targets = targets(2);
        for bad in [
            "",
            "1-2.",
            "1-2.abcd",
            "1-2.abcd.0",
            "1-2.ABCD.0.0",
            "1-2.abc.0.0",
            "1-2.abcd.0.3",
            "1-2.abcd.0.x",
            "1-2.abcd..0",
            "1-2.abcd.0.99999999999999999999",
        ] {
            assert!(
                StreamPosition::parse(bad, &targets).is_err(),
                "{bad:?} parsed"
            );
        }
        assert_eq!(
            StreamPosition::parse(&"1".repeat(500), &targets),
            Err(PositionError::TooLong)
        );
    }

    proptest! {
        #[test]
        fn positions_round_trip(epoch in any::<u64>(), seqs in proptest::collection::vec(any::<u64>(), 1..8)) {
            let targets = targets(seqs.len());
            let position = StreamPosition { epoch: Epoch(epoch), seqs };
            let id = written(&position, &targets);
            prop_assert_eq!(StreamPosition::parse(&id, &targets), Ok(position));
        }

        #[test]
        fn arbitrary_input_never_panics(value in "\\PC{0,96}") {
            let _ = StreamPosition::parse(&value, &targets(3));
        }
    }
}
