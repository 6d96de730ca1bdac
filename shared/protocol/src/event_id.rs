//! SSE event ids: which bus history an event came from, and where in it.
//!
//! An id is written `<epoch>-<seq>`: the bus epoch in lowercase hexadecimal,
//! a dash, and the stream sequence in decimal (e.g. `18c3f2a1-42`). Clients treat
//! it as opaque and send it back as `Last-Event-ID`.
//!
//! The epoch names one incarnation of the history (a memory bus process, a
//! JetStream stream as created). A sequence is only meaningful within its epoch:
//! after a stream is recreated, sequence 42 is a different event, so an id from
//! another epoch means "history lost", never "replay from 42".

use std::fmt;
use std::str::FromStr;

/// One incarnation of a bus history. Sequences from different epochs are unrelated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch(pub u64);

/// The position of one event: its epoch and its stream sequence (from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventId {
    /// The history this sequence belongs to.
    pub epoch: Epoch,
    /// The stream sequence, strictly increasing within the epoch.
    pub seq: u64,
}

/// Why a `Last-Event-ID` value could not be read. Parsing changes no state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventIdError {
    /// The value is longer than any id Herald writes.
    #[error("event id is too long")]
    TooLong,
    /// The value is not `<hex epoch>-<decimal seq>`.
    #[error("event id is not of the form <epoch>-<sequence>")]
    Malformed,
}

/// The longest id Herald writes: 16 hex digits, a dash, 20 decimal digits.
const MAX_ID_LEN: usize = 16 + 1 + 20;

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:x}-{}", self.epoch.0, self.seq)
    }
}

impl EventId {
    /// The id as [`Display`](fmt::Display) writes it, without the
    /// formatter: ids are written at every published event (its frame, the
    /// publisher's answer).
    pub fn encode(&self) -> EncodedId {
        let mut buf = [0u8; MAX_ID_LEN];
        let mut len = 0;
        // The epoch's hex digits, most significant first, no leading zeros.
        let digits = (16 - self.epoch.0.leading_zeros() as usize / 4).max(1);
        for shift in (0..digits).rev() {
            buf[len] = b"0123456789abcdef"[((self.epoch.0 >> (shift * 4)) & 0xf) as usize];
            len += 1;
        }
        buf[len] = b'-';
        len += 1;
        // The sequence's decimal digits, written backwards then turned.
        let start = len;
        let mut seq = self.seq;
        loop {
            buf[len] = b'0' + (seq % 10) as u8;
            len += 1;
            seq /= 10;
            if seq == 0 {
                break;
            }
        }
        buf[start..len].reverse();
        EncodedId { buf, len }
    }
}

/// An id as written, held without allocating (see [`EventId::encode`]).
#[derive(Debug, Clone, Copy)]
pub struct EncodedId {
    buf: [u8; MAX_ID_LEN],
    len: usize,
}

impl EncodedId {
    /// The written id's bytes (ASCII).
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl FromStr for EventId {
    type Err = EventIdError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        if value.len() > MAX_ID_LEN {
            return Err(EventIdError::TooLong);
        }
        let (epoch, seq) = value.split_once('-').ok_or(EventIdError::Malformed)?;
        let is_lower_hex = |c: char| c.is_ascii_digit() || ('a'..='f').contains(&c);
        if epoch.is_empty() || epoch.len() > 16 || !epoch.chars().all(is_lower_hex) {
            return Err(EventIdError::Malformed);
        }
        if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err(EventIdError::Malformed);
        }
        let epoch = u64::from_str_radix(epoch, 16).map_err(|_| EventIdError::Malformed)?;
        let seq = seq.parse().map_err(|_| EventIdError::Malformed)?;
        Ok(EventId {
            epoch: Epoch(epoch),
            seq,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_id_is_hex_epoch_dash_decimal_sequence() {
        let id = EventId {
            epoch: Epoch(0x18c3f2a1),
            seq: 42,
        };
        assert_eq!(id.to_string(), "18c3f2a1-42");
        assert_eq!(id.encode().as_bytes(), b"18c3f2a1-42");
        for (epoch, seq, written) in [
            (0, 0, "0-0"),
            (0xf, 10, "f-10"),
            (u64::MAX, u64::MAX, "ffffffffffffffff-18446744073709551615"),
        ] {
            let id = EventId {
                epoch: Epoch(epoch),
                seq,
            };
            assert_eq!(id.encode().as_bytes(), written.as_bytes());
        }
        assert_eq!("18c3f2a1-42".parse::<EventId>(), Ok(id));
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in [
            "",
            "42",
            "-1",
            "x-1",
            "1-",
            "1-+2",
            "1--2",
            "1-2-3",
            "A-1",
            " 1-2",
            "1-2 ",
            "1-99999999999999999999",
        ] {
            assert!(bad.parse::<EventId>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            "f".repeat(100).parse::<EventId>(),
            Err(EventIdError::TooLong)
        );
    }

    proptest! {
        #[test]
        fn ids_round_trip(epoch in any::<u64>(), seq in any::<u64>()) {
            let id = EventId { epoch: Epoch(epoch), seq };
            prop_assert_eq!(id.to_string().parse::<EventId>(), Ok(id));
        }

        #[test]
        fn encode_writes_what_display_writes(epoch in any::<u64>(), seq in any::<u64>()) {
            let id = EventId { epoch: Epoch(epoch), seq };
            let (encoded, displayed) = (id.encode(), id.to_string());
            prop_assert_eq!(encoded.as_bytes(), displayed.as_bytes());
        }

        #[test]
        fn arbitrary_input_never_panics(value in "\\PC{0,64}") {
            let _ = value.parse::<EventId>();
        }
    }
}
