//! Where a stream stands in each of its targets: which events it has
//! written, and the id it writes with each.

use bytes::BytesMut;
use herald_protocol::{Epoch, StreamPosition, Target, fingerprint_of};

use crate::bus::Event;

/// Where a stream stands in each of its targets, so every event is written
/// once and every id it writes is enough to resume exactly.
///
/// Each target's events arrive in that target's sequence order, and an event
/// at or below its target's position was already written (by the replay or
/// an earlier live delivery). Two targets' events may arrive in either order
/// (the NATS bus follows each target on its own), so the id written with an
/// event carries every target's position ([`StreamPosition`]); a stream with
/// one target, or on a bus that delivers every target in one global order,
/// writes the event's own id, which says the same.
pub(super) struct Cursor {
    position: StreamPosition,
    fingerprint: u16,
    /// Ids are the events' own (one target, or one global order).
    own_ids: bool,
    /// The position moved since the client last saw it in an id (progress
    /// alone, or the replay's end).
    untold: bool,
}

/// What [`Cursor::write`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Written {
    /// Appended, with its id.
    Yes,
    /// Already written (or not for this stream): nothing appended.
    Skipped,
    /// From another epoch than the stream's positions: the history changed
    /// under the stream, which must end so its client is told.
    OtherEpoch,
}

impl Cursor {
    pub(super) fn new(position: StreamPosition, targets: &[Target], in_order: bool) -> Self {
        Cursor {
            position,
            fingerprint: fingerprint_of(targets),
            own_ids: targets.len() == 1 || in_order,
            untold: false,
        }
    }

    /// The epoch of the stream's positions.
    pub(super) fn epoch(&self) -> Epoch {
        self.position.epoch
    }

    /// Appends `event` (for the stream's target `slot`) unless already written.
    pub(super) fn write(&mut self, slot: u32, event: &Event, buf: &mut BytesMut) -> Written {
        if event.id.epoch != self.position.epoch {
            return Written::OtherEpoch;
        }
        let seq = event.id.seq;
        match self.position.seqs.get(slot as usize) {
            Some(&at) if seq > at => {}
            _ => return Written::Skipped,
        }
        if self.own_ids {
            // One order: every target is complete up to this event.
            self.advance_all(seq);
            buf.extend_from_slice(&event.frame);
        } else {
            self.position.seqs[slot as usize] = seq;
            buf.extend_from_slice(b"id: ");
            self.write_position(buf);
            buf.extend_from_slice(b"\n");
            buf.extend_from_slice(event.body());
        }
        self.untold = false;
        Written::Yes
    }

    /// Every event of target `slot` up to `through` has been written.
    pub(super) fn advance(&mut self, slot: u32, through: u64) {
        if let Some(at) = self.position.seqs.get_mut(slot as usize) {
            if through > *at {
                *at = through;
                self.untold = true;
            }
        }
    }

    /// Every event of every target up to `through` has been written.
    pub(super) fn advance_all(&mut self, through: u64) {
        for at in &mut self.position.seqs {
            if through > *at {
                *at = through;
                self.untold = true;
            }
        }
    }

    /// Appends an id-only frame with the current position.
    pub(super) fn write_id(&mut self, buf: &mut BytesMut) {
        buf.extend_from_slice(b"id: ");
        self.write_position(buf);
        buf.extend_from_slice(b"\n\n");
        self.untold = false;
    }

    /// Appends an id-only frame if the position moved since the client was
    /// last told it; returns whether it did.
    pub(super) fn write_id_if_moved(&mut self, buf: &mut BytesMut) -> bool {
        if !self.untold {
            return false;
        }
        self.write_id(buf);
        true
    }

    fn write_position(&self, buf: &mut BytesMut) {
        // Straight into the batch buffer (no id string per event); writing
        // into a `BytesMut` cannot fail.
        let _ = self.position.write(self.fingerprint, buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_protocol::EventId;
    use std::time::SystemTime;

    fn targets(n: usize) -> Vec<Target> {
        let mut targets = vec![Target::user("alice").expect("valid")];
        for i in 1..n {
            targets.push(Target::topic(format!("t{i}")).expect("valid"));
        }
        targets
    }

    fn event(target: &Target, epoch: u64, seq: u64) -> Event {
        let id = EventId {
            epoch: Epoch(epoch),
            seq,
        };
        Event::new(id, target.clone(), None, "x", SystemTime::now())
    }

    fn cursor(targets: &[Target], start: u64, in_order: bool) -> Cursor {
        let at = EventId {
            epoch: Epoch(1),
            seq: start,
        };
        Cursor::new(StreamPosition::at(at, targets.len()), targets, in_order)
    }

    #[test]
    fn an_event_already_written_for_its_target_is_skipped() {
        let targets = targets(1);
        let mut cursor = cursor(&targets, 5, false);
        let mut buf = BytesMut::new();
        assert_eq!(
            cursor.write(0, &event(&targets[0], 1, 5), &mut buf),
            Written::Skipped
        );
        assert_eq!(
            cursor.write(0, &event(&targets[0], 1, 6), &mut buf),
            Written::Yes
        );
        assert_eq!(
            cursor.write(0, &event(&targets[0], 1, 6), &mut buf),
            Written::Skipped
        );
        assert_eq!(&buf[..], b"id: 1-6\ndata: x\n\n");
    }

    #[test]
    fn with_several_targets_each_id_carries_every_targets_position() {
        let targets = targets(2);
        let mut cursor = cursor(&targets, 0, false);
        let mut buf = BytesMut::new();
        // The topic's 10 arrives before the user's 9: the id after 10 still
        // says the user stands at 0, so a resume from it replays 9.
        assert_eq!(
            cursor.write(1, &event(&targets[1], 1, 10), &mut buf),
            Written::Yes
        );
        let fingerprint = format!("{:04x}", fingerprint_of(&targets));
        assert_eq!(
            String::from_utf8_lossy(&buf),
            format!("id: 1-10.{fingerprint}.10.0\ndata: x\n\n")
        );
        let after_ten =
            StreamPosition::parse(&format!("1-10.{fingerprint}.10.0"), &targets).expect("parses");
        assert_eq!(after_ten.seqs, vec![0, 10]);
        buf.clear();
        assert_eq!(
            cursor.write(0, &event(&targets[0], 1, 9), &mut buf),
            Written::Yes
        );
        assert_eq!(
            String::from_utf8_lossy(&buf),
            format!("id: 1-10.{fingerprint}.1.0\ndata: x\n\n")
        );
    }

    #[test]
    fn progress_moves_a_quiet_targets_position_and_is_told_at_the_next_heartbeat() {
        let targets = targets(2);
        let mut cursor = cursor(&targets, 4, false);
        let mut buf = BytesMut::new();
        assert!(!cursor.write_id_if_moved(&mut buf));
        cursor.advance(1, 20);
        assert!(cursor.write_id_if_moved(&mut buf));
        let fingerprint = format!("{:04x}", fingerprint_of(&targets));
        assert_eq!(
            String::from_utf8_lossy(&buf),
            format!("id: 1-20.{fingerprint}.16.0\n\n")
        );
        assert!(!cursor.write_id_if_moved(&mut buf));
    }

    #[test]
    fn a_bus_with_one_global_order_writes_the_events_own_ids() {
        let targets = targets(2);
        let mut cursor = cursor(&targets, 0, true);
        let mut buf = BytesMut::new();
        assert_eq!(
            cursor.write(1, &event(&targets[1], 1, 3), &mut buf),
            Written::Yes
        );
        assert_eq!(&buf[..], b"id: 1-3\ndata: x\n\n");
        // Every target stands at 3 now.
        assert_eq!(
            cursor.write(0, &event(&targets[0], 1, 2), &mut buf),
            Written::Skipped
        );
    }

    #[test]
    fn an_event_of_another_epoch_ends_the_stream_instead_of_being_written() {
        let targets = targets(1);
        let mut cursor = cursor(&targets, 0, false);
        let mut buf = BytesMut::new();
        assert_eq!(
            cursor.write(0, &event(&targets[0], 2, 7), &mut buf),
            Written::OtherEpoch
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn an_event_for_an_unknown_slot_is_ignored() {
        let targets = targets(1);
        let mut cursor = cursor(&targets, 0, false);
        let mut buf = BytesMut::new();
        assert_eq!(
            cursor.write(3, &event(&targets[0], 1, 1), &mut buf),
            Written::Skipped
        );
        assert!(buf.is_empty());
    }
}
