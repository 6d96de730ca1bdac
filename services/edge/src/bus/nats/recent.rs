//! The events a node keeps for a target whose last stream just closed, so a
//! client coming back to the same node resumes without reading the stream.
//!
//! When the last local stream of a target closes, the node keeps following
//! it for `nats.linger_secs` ([`follow`](super::follow)), and its chain keeps
//! extending as before. From then on the dispatcher records every event it
//! delivers for the target in its [`Recent`] (at most
//! `nats.linger_max_events`, the oldest dropped first).
//!
//! # Why the kept events are a complete answer
//!
//! The record starts at the chain's end, its **floor**, and only a delivery
//! adds to it: a delivery always connects to the chain's end (see
//! [`chain`](super::chain)). So the record holds every event of the target
//! stored after the floor, up to the chain's end, whatever order copies came
//! in. Dropping the oldest raises the floor to the event dropped; moving the
//! chain's end any other way (anchoring it again) starts the record again at
//! the new end; a history that changed makes it unusable until then.
//!
//! A resuming stream attaches to the registry first, then asks: an event
//! delivered before the answer was taken is in the record, one delivered
//! after it reaches the stream's queue (the dispatcher answers between two
//! deliveries). So a client at position `after >= floor` needs exactly the
//! recorded events after `after`, then the queue: the answer's `head` is the
//! chain's end (or `after`, when the client is past it), and the cursor skips
//! queued events at or below it. A position past the chain's end is only
//! taken when it is known to be a real position of the stream (at most a
//! head this node has seen in this epoch): an invented one is left to the
//! stream read, which answers it with a reset.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use herald_protocol::Epoch;

use crate::bus::Event;

/// The events kept for one target; see the module docs.
#[derive(Debug)]
pub(super) struct Recent {
    /// Every event of the target stored after this sequence and delivered
    /// is in `events`; `None`: unusable until the chain is anchored again.
    floor: Option<u64>,
    /// The epoch the floor and the events belong to.
    epoch: Epoch,
    /// Delivered events after the floor, oldest first.
    events: VecDeque<Arc<Event>>,
    /// Most events kept.
    capacity: usize,
    /// Set when a stream follows the target again: the record is dropped
    /// once this passes (the returning streams have asked by then).
    keep_until: Option<Instant>,
}

/// A target's part of an answer.
#[derive(Debug)]
pub(super) struct Part {
    /// The kept events after the client's position, oldest first.
    pub(super) events: Vec<Arc<Event>>,
    /// The target is complete for the client up to here.
    pub(super) through: u64,
}

impl Recent {
    /// A record starting at the chain's end `floor` (`None`: the chain is not
    /// anchored yet), in `epoch`.
    pub(super) fn starting_at(floor: Option<u64>, epoch: Epoch, capacity: usize) -> Self {
        Recent {
            floor,
            epoch,
            events: VecDeque::new(),
            capacity: capacity.max(1),
            keep_until: None,
        }
    }

    /// The chain was anchored at `end` in `epoch`: start again from there.
    pub(super) fn anchored(&mut self, end: u64, epoch: Epoch) {
        self.floor = Some(end);
        self.epoch = epoch;
        self.events.clear();
    }

    /// The history changed: unusable until the chain is anchored again.
    pub(super) fn invalidate(&mut self) {
        self.floor = None;
        self.events.clear();
    }

    /// Records an event just delivered (it connected to the chain's end).
    pub(super) fn delivered(&mut self, event: &Arc<Event>) {
        if self.events.len() == self.capacity {
            if let Some(oldest) = self.events.pop_front() {
                self.floor = self.floor.map(|_| oldest.id.seq);
            }
        }
        self.events.push_back(Arc::clone(event));
    }

    /// A stream follows the target again: keep the record until `until`.
    pub(super) fn keep_until(&mut self, until: Instant) {
        self.keep_until = Some(until);
    }

    /// Whether the record has served its purpose by `now`.
    pub(super) fn expired(&self, now: Instant) -> bool {
        self.keep_until.is_some_and(|until| now >= until)
    }

    /// What a client at `after` in `epoch` needs of this target, with the
    /// chain ending at `end`; `None` when the record cannot tell (the stream
    /// is read instead). `known` says whether a position past the chain's
    /// end is a real one.
    pub(super) fn after(
        &self,
        epoch: Epoch,
        after: u64,
        end: u64,
        known: impl FnOnce(u64) -> bool,
    ) -> Option<Part> {
        let floor = self.floor?;
        if epoch != self.epoch || after < floor || (after > end && !known(after)) {
            return None;
        }
        // Events are in sequence order: skip those the client has.
        let start = self.events.partition_point(|event| event.id.seq <= after);
        Some(Part {
            events: self.events.range(start..).cloned().collect(),
            through: end.max(after),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_protocol::{EventId, Target};
    use std::time::{Duration, SystemTime};

    const EPOCH: Epoch = Epoch(7);

    fn event(seq: u64) -> Arc<Event> {
        Arc::new(Event::new(
            EventId { epoch: EPOCH, seq },
            Target::user("alice").expect("valid"),
            None,
            "x",
            SystemTime::now(),
        ))
    }

    fn seqs(part: &Part) -> Vec<u64> {
        part.events.iter().map(|event| event.id.seq).collect()
    }

    fn record(floor: u64, delivered: &[u64], capacity: usize) -> Recent {
        let mut recent = Recent::starting_at(Some(floor), EPOCH, capacity);
        for &seq in delivered {
            recent.delivered(&event(seq));
        }
        recent
    }

    #[test]
    fn a_client_at_or_after_the_floor_gets_exactly_the_events_after_its_position() {
        let recent = record(10, &[14, 20, 31], 8);
        let all = recent.after(EPOCH, 10, 31, |_| false).expect("answer");
        assert_eq!(seqs(&all), vec![14, 20, 31]);
        assert_eq!(all.through, 31);
        // Between two of the target's events (another target's sequence).
        let some = recent.after(EPOCH, 17, 31, |_| false).expect("answer");
        assert_eq!(seqs(&some), vec![20, 31]);
        let none = recent.after(EPOCH, 31, 31, |_| false).expect("answer");
        assert!(none.events.is_empty());
    }

    #[test]
    fn a_client_behind_the_floor_is_left_to_the_stream() {
        let recent = record(10, &[14], 8);
        assert!(recent.after(EPOCH, 9, 14, |_| true).is_none());
    }

    #[test]
    fn dropping_the_oldest_event_raises_the_floor_to_it() {
        let recent = record(10, &[11, 12, 13, 14], 3);
        assert!(recent.after(EPOCH, 10, 14, |_| true).is_none());
        let part = recent.after(EPOCH, 11, 14, |_| true).expect("answer");
        assert_eq!(seqs(&part), vec![12, 13, 14]);
    }

    #[test]
    fn a_position_past_the_chain_end_is_taken_only_when_known_to_be_real() {
        let recent = record(10, &[14], 8);
        assert!(recent.after(EPOCH, 500, 14, |_| false).is_none());
        let part = recent
            .after(EPOCH, 500, 14, |seq| seq <= 600)
            .expect("answer");
        assert!(part.events.is_empty());
        assert_eq!(part.through, 500);
    }

    #[test]
    fn another_epoch_or_an_unanchored_chain_gives_no_answer() {
        let mut recent = record(10, &[14], 8);
        assert!(recent.after(Epoch(8), 10, 14, |_| true).is_none());
        recent.invalidate();
        assert!(recent.after(EPOCH, 10, 14, |_| true).is_none());
        // Anchored again: a fresh record from the new end.
        recent.anchored(40, Epoch(8));
        assert!(recent.after(Epoch(8), 39, 40, |_| true).is_none());
        let part = recent.after(Epoch(8), 40, 40, |_| true).expect("answer");
        assert!(part.events.is_empty());
        let unanchored = Recent::starting_at(None, EPOCH, 8);
        assert!(unanchored.after(EPOCH, 0, 0, |_| true).is_none());
    }

    #[test]
    fn a_record_kept_for_returning_streams_expires_after_its_time() {
        let mut recent = record(10, &[], 8);
        let now = Instant::now();
        assert!(!recent.expired(now + Duration::from_secs(3600)));
        recent.keep_until(now + Duration::from_secs(5));
        assert!(!recent.expired(now));
        assert!(recent.expired(now + Duration::from_secs(5)));
    }
}
