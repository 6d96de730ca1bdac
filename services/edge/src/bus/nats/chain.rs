//! The invariant every live delivery rests on: each followed target's
//! deliveries form a chain, and a message is delivered only when it connects
//! to the chain's end.
//!
//! The stream RePublishes each stored message with `Nats-Sequence` (its
//! sequence), `Nats-Last-Sequence` (the previous sequence stored on the same
//! subject) and `Nats-Time-Stamp` (when it was stored). A node keeps, per
//! followed target, the sequence and store time of the last event it
//! delivered ([`Link`]). A live copy is judged against that link from its own
//! headers alone, never from when a notification arrived:
//!
//! - newer, and its previous sequence is the link's: it **connects**;
//! - newer, but its previous sequence is another: events in between never
//!   arrived (a lost copy), or the link's event was removed: a **gap**, filled
//!   from the stream first (which also checks the link still stands);
//! - the link's own sequence with the same store time, or an older sequence
//!   stored no later: a **duplicate** (a leader re-sending after an
//!   election), dropped silently;
//! - the link's sequence with another store time, or an older sequence stored
//!   *later* than the link's event: the sequence now names another event, so
//!   the stored history went back: **rewound** (confirmed against the stream
//!   before anyone is told).

use std::cmp::Ordering;
use std::time::SystemTime;

/// Where a target's chain ends: the last event delivered for it (sequence 0:
/// none yet, the target had no stored event).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Link {
    /// Stream sequence.
    pub(crate) seq: u64,
    /// When the stream stored it (`None` when the stream did not say).
    pub(crate) stored_at: Option<SystemTime>,
}

/// A republished (live) copy's place in its subject's chain, from its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LiveLink {
    /// `Nats-Sequence`.
    pub(crate) seq: u64,
    /// `Nats-Last-Sequence`: the previous sequence stored on the subject.
    pub(crate) previous: u64,
    /// `Nats-Time-Stamp`.
    pub(crate) stored_at: Option<SystemTime>,
}

/// What to do with a live copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Connects to the chain's end: deliver it.
    Connects,
    /// Already delivered: drop it silently.
    Duplicate,
    /// Something between the chain's end and this copy is missing: fill from
    /// the stream before delivering anything more of this target.
    Gap,
    /// The copy names a sequence the chain already passed, for another event:
    /// the stored history went back.
    Rewound,
}

/// Judges `copy` against the chain ending at `last`.
pub(crate) fn judge(last: Link, copy: LiveLink) -> Verdict {
    let stored_later = match (copy.stored_at, last.stored_at) {
        (Some(copy), Some(last)) => Some(copy.cmp(&last)),
        _ => None,
    };
    match copy.seq.cmp(&last.seq) {
        Ordering::Greater if copy.previous == last.seq => Verdict::Connects,
        Ordering::Greater => Verdict::Gap,
        Ordering::Equal => match stored_later {
            Some(Ordering::Equal) | None => Verdict::Duplicate,
            Some(_) => Verdict::Rewound,
        },
        Ordering::Less => match stored_later {
            Some(Ordering::Greater) => Verdict::Rewound,
            _ => Verdict::Duplicate,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn at(micros: u64) -> Option<SystemTime> {
        Some(UNIX_EPOCH + Duration::from_micros(micros))
    }

    fn link(seq: u64, time: u64) -> Link {
        Link {
            seq,
            stored_at: at(time),
        }
    }

    fn copy(seq: u64, previous: u64, time: u64) -> LiveLink {
        LiveLink {
            seq,
            previous,
            stored_at: at(time),
        }
    }

    #[test]
    fn a_copy_whose_previous_sequence_is_the_last_delivered_connects() {
        assert_eq!(judge(link(10, 100), copy(14, 10, 140)), Verdict::Connects);
        assert_eq!(judge(Link::default(), copy(3, 0, 30)), Verdict::Connects);
    }

    #[test]
    fn a_copy_that_does_not_connect_is_a_gap_never_a_delivery() {
        assert_eq!(judge(link(10, 100), copy(14, 12, 140)), Verdict::Gap);
        // The link's event was removed (or the history rewritten): the fill
        // reads the stream and checks which.
        assert_eq!(judge(link(10, 100), copy(14, 7, 140)), Verdict::Gap);
        assert_eq!(judge(Link::default(), copy(3, 2, 30)), Verdict::Gap);
    }

    #[test]
    fn the_same_sequence_with_the_same_store_time_is_a_resend() {
        assert_eq!(judge(link(10, 100), copy(10, 8, 100)), Verdict::Duplicate);
    }

    #[test]
    fn the_same_sequence_with_another_store_time_is_a_rewound_history() {
        assert_eq!(judge(link(10, 100), copy(10, 8, 250)), Verdict::Rewound);
        assert_eq!(judge(link(10, 100), copy(10, 8, 90)), Verdict::Rewound);
    }

    #[test]
    fn an_older_sequence_is_a_late_copy_unless_it_was_stored_later() {
        assert_eq!(judge(link(10, 100), copy(9, 8, 90)), Verdict::Duplicate);
        assert_eq!(judge(link(10, 100), copy(9, 8, 300)), Verdict::Rewound);
    }

    #[test]
    fn without_store_times_nothing_is_called_rewound() {
        let last = Link {
            seq: 10,
            stored_at: None,
        };
        assert_eq!(judge(last, copy(10, 8, 300)), Verdict::Duplicate);
        assert_eq!(judge(last, copy(9, 8, 300)), Verdict::Duplicate);
    }
}
