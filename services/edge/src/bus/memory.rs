//! The embedded bus: one process, history in memory, for trying Herald without a
//! broker. It gives the same guarantees as the NATS bus within its limits: one
//! global sequence, replay after a position, dedupe by `msg_id`, and an explicit
//! "history lost" answer once events were evicted or the process restarted (each
//! process starts a new random epoch).
//!
//! Publishing holds one mutex while it assigns the sequence, stores the event and
//! hands it to the sink, so live delivery sees events in sequence order across
//! all targets. It is not a production bus: a single node, nothing survives a
//! restart, and it says so in the logs.
//!
//! The work under that mutex is kept to what a publish must do (it runs at
//! every event, on the node's busiest path): one lookup of the target (its
//! latest stored sequence; the target's older events are chained through
//! their predecessors), one of the `msg_id`, and eviction that looks nothing
//! up (see [`History`]).

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use herald_config::MemoryBusSettings;
use herald_protocol::{Epoch, EventId, StreamPosition, Target};
use tokio::sync::watch;

use super::{
    Bus, Event, FollowState, Interest, LiveSink, LostReason, PublishError, PublishRequest, Receipt,
    Replay, ReplayError, check_position,
};

/// The embedded single-node bus.
pub(crate) struct MemoryBus {
    epoch: Epoch,
    limits: Limits,
    sink: Arc<dyn LiveSink>,
    state: Mutex<History>,
    /// Handed to every follower: the memory bus is always live. One shared
    /// receiver instead of a channel per target keeps followed targets cheap.
    ready: watch::Receiver<FollowState>,
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBus")
            .field("epoch", &self.epoch)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy)]
struct Limits {
    max_events: usize,
    max_bytes: usize,
    max_age: Duration,
    duplicate_window: Duration,
}

/// The stored events and the dedupe table.
///
/// A target's stored events form a chain, newest first: `last_of` holds its
/// latest sequence and every stored event the one before it (`prev`). A
/// publish looks its target up once; evicting the oldest event looks nothing
/// up, so a target whose events were all evicted keeps a stale entry (its
/// sequence is below the oldest stored one: a replay finds nothing through
/// it) until [`History::prune`] sweeps such entries out, once they could
/// outnumber the stored events.
#[derive(Default)]
struct History {
    /// The last sequence assigned (0 before the first event).
    last_seq: u64,
    /// Stored events, contiguous in sequence, oldest first.
    events: VecDeque<Stored>,
    /// Sum of the stored frames' sizes.
    bytes: usize,
    /// Each target's latest stored sequence (stale once evicted, see above).
    last_of: HashMap<Target, u64>,
    /// `msg_id`s inside the duplicate window.
    recent: RecentIds,
}

/// One stored event.
struct Stored {
    /// When it was stored (age eviction, on a monotonic clock).
    at: Instant,
    /// The sequence of its target's previous event (0: none was stored).
    prev: u64,
    event: Arc<Event>,
}

/// The `msg_id`s published inside the duplicate window, with their
/// sequences. Each key is stored once, with its hash: an entry that expires
/// is found again by its hash and its sequence (unique), and the table grows
/// (it holds every id of the window: 1.2 million at 10,000 publishes a
/// second) without hashing or even reading a key again.
#[derive(Default)]
struct RecentIds {
    hasher: RandomState,
    ids: hashbrown::HashTable<RecentId>,
    /// (seen at, hash, sequence) in the order seen, to expire them.
    order: VecDeque<(Instant, u64, u64)>,
}

struct RecentId {
    msg_id: Box<str>,
    seq: u64,
    hash: u64,
}

impl RecentIds {
    /// The sequence stored for `msg_id`, if it is inside the window.
    fn get(&self, msg_id: &str) -> Option<u64> {
        let hash = self.hasher.hash_one(msg_id);
        self.ids
            .find(hash, |id| id.hash == hash && *id.msg_id == *msg_id)
            .map(|id| id.seq)
    }

    /// Remembers `msg_id` as published at `seq` (not already present: the
    /// caller looked it up under the same lock).
    fn insert(&mut self, msg_id: String, seq: u64, now: Instant) {
        let hash = self.hasher.hash_one(msg_id.as_str());
        let id = RecentId {
            msg_id: msg_id.into_boxed_str(),
            seq,
            hash,
        };
        self.ids.insert_unique(hash, id, |id| id.hash);
        self.order.push_back((now, hash, seq));
    }

    /// Forgets the ids seen longer than `window` ago.
    fn expire(&mut self, window: Duration, now: Instant) {
        while let Some(&(seen, hash, seq)) = self.order.front() {
            if now.duration_since(seen) <= window {
                break;
            }
            self.order.pop_front();
            if let Ok(entry) = self.ids.find_entry(hash, |id| id.seq == seq) {
                entry.remove();
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.ids.len()
    }
}

impl MemoryBus {
    /// A new bus with an epoch of its own, delivering live events to `sink`.
    pub(crate) fn new(settings: &MemoryBusSettings, sink: Arc<dyn LiveSink>) -> Self {
        // Any value works as long as a restarted process picks another one.
        let epoch = Epoch(fastrand::u64(1..=u64::from(u32::MAX)));
        MemoryBus {
            epoch,
            limits: Limits {
                max_events: settings.max_events,
                max_bytes: settings.max_bytes,
                max_age: Duration::from_secs(settings.max_age_secs),
                duplicate_window: Duration::from_secs(settings.duplicate_window_secs),
            },
            sink,
            state: Mutex::new(History::default()),
            ready: watch::channel(FollowState::Ready).1,
        }
    }

    /// This incarnation's epoch.
    #[cfg(test)]
    pub(crate) fn epoch(&self) -> Epoch {
        self.epoch
    }

    fn lock(&self) -> MutexGuard<'_, History> {
        // A panic while holding the lock cannot leave the history half-updated
        // in a way that matters more than losing the node, so recover the data.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn id(&self, seq: u64) -> EventId {
        EventId {
            epoch: self.epoch,
            seq,
        }
    }
}

impl History {
    /// Drops events and dedupe entries beyond the limits.
    fn evict(&mut self, limits: &Limits, now: Instant) {
        while let Some(oldest) = self.events.front() {
            let too_many = self.events.len() > limits.max_events;
            let too_big = self.bytes > limits.max_bytes;
            let too_old = now.duration_since(oldest.at) > limits.max_age;
            if !(too_many || too_big || too_old) {
                break;
            }
            self.bytes -= oldest.event.frame.len();
            self.events.pop_front();
        }
        self.recent.expire(limits.duplicate_window, now);
    }

    /// The sequence of the oldest stored event (last + 1 when empty).
    fn first_seq(&self) -> u64 {
        self.events
            .front()
            .map_or(self.last_seq + 1, |oldest| oldest.event.id.seq)
    }

    /// The stored event of sequence `seq`, if it is still stored (stored
    /// sequences are contiguous, so a sequence is an index).
    fn stored(&self, seq: u64) -> Option<&Stored> {
        let index = seq.checked_sub(self.first_seq())?;
        self.events.get(usize::try_from(index).ok()?)
    }

    /// Stores `event` (the next sequence) at `now`.
    fn store(&mut self, event: &Arc<Event>, now: Instant) {
        let seq = event.id.seq;
        // A known target is found by reference: no copy of its name.
        let prev = match self.last_of.get_mut(&event.target) {
            Some(last) => std::mem::replace(last, seq),
            None => {
                self.last_of.insert(event.target.clone(), seq);
                0
            }
        };
        self.last_seq = seq;
        self.bytes += event.frame.len();
        self.events.push_back(Stored {
            at: now,
            prev,
            event: Arc::clone(event),
        });
    }

    /// Sweeps out the targets none of whose events is stored any more, once
    /// there are more entries than twice the stored events (and a floor, so
    /// a small history is not swept at every publish): each sweep at least
    /// halves the table, so its cost spreads over the publishes that filled
    /// it, like a table's growth.
    fn prune(&mut self) {
        if self.last_of.len() <= PRUNE_FLOOR + 2 * self.events.len() {
            return;
        }
        let first = self.first_seq();
        self.last_of.retain(|_, &mut last| last >= first);
    }

    /// `target`'s stored events after sequence `after`, newest first; `None`
    /// when there are more than `room`.
    fn events_of(&self, target: &Target, after: u64, room: usize) -> Option<Vec<&Arc<Event>>> {
        let mut found = Vec::new();
        let mut seq = self.last_of.get(target).copied().unwrap_or(0);
        while seq > after {
            // Below the oldest stored event the chain is gone (the caller
            // checked that nothing after `after` was evicted).
            let Some(stored) = self.stored(seq) else {
                break;
            };
            if found.len() == room {
                return None;
            }
            found.push(&stored.event);
            seq = stored.prev;
        }
        Some(found)
    }
}

/// Stale target entries tolerated before any sweep (see [`History::prune`]).
const PRUNE_FLOOR: usize = 1024;

impl Interest for MemoryBus {
    fn follow(&self, _target: &Target) -> watch::Receiver<FollowState> {
        // Every publish is handed to the sink, which drops what no one holds.
        self.ready.clone()
    }

    fn unfollow(&self, _target: &Target) {}
}

#[async_trait::async_trait]
impl Bus for MemoryBus {
    fn kind(&self) -> &'static str {
        "memory"
    }

    fn is_ready(&self) -> bool {
        true
    }

    /// Publishing hands every event to the sink under one lock, in sequence
    /// order across all targets.
    fn delivers_in_order(&self) -> bool {
        true
    }

    async fn publish(&self, request: PublishRequest) -> Result<Receipt, PublishError> {
        let now = Instant::now();
        let mut history = self.lock();
        history.evict(&self.limits, now);
        if let Some(seq) = request
            .msg_id
            .as_deref()
            .and_then(|msg_id| history.recent.get(msg_id))
        {
            return Ok(Receipt {
                id: self.id(seq),
                duplicate: true,
            });
        }
        let seq = history.last_seq + 1;
        let event = Arc::new(
            Event::new(
                self.id(seq),
                request.target,
                request.event_type,
                &request.data,
                SystemTime::now(),
            )
            .with_trace(request.trace),
        );
        if event.frame.len() > self.limits.max_bytes {
            return Err(PublishError::TooLarge {
                size: event.frame.len(),
                limit: self.limits.max_bytes,
            });
        }
        history.store(&event, now);
        if let Some(msg_id) = request.msg_id {
            history.recent.insert(msg_id, seq, now);
        }
        history.evict(&self.limits, now);
        history.prune();
        // Still under the lock: live delivery happens in sequence order.
        self.sink.deliver(&event);
        Ok(Receipt {
            id: event.id,
            duplicate: false,
        })
    }

    async fn head(&self) -> Result<EventId, ReplayError> {
        Ok(self.id(self.lock().last_seq))
    }

    async fn replay(
        &self,
        targets: &[Target],
        from: &StreamPosition,
        limit: usize,
    ) -> Result<Replay, ReplayError> {
        let mut history = self.lock();
        history.evict(&self.limits, Instant::now());
        let head = self.id(history.last_seq);
        let lost = |reason| Ok(Replay::HistoryLost { reason, head });
        let first = history.first_seq();
        let mut events = Vec::new();
        for (target, &after) in targets.iter().zip(&from.seqs) {
            let position = EventId {
                epoch: from.epoch,
                seq: after,
            };
            if let Some(reason) = check_position(position, self.epoch, first, history.last_seq) {
                return lost(reason);
            }
            let room = limit.saturating_sub(events.len());
            let Some(found) = history.events_of(target, after, room) else {
                return lost(LostReason::TooFarBehind);
            };
            events.extend(found.into_iter().rev().map(Arc::clone));
        }
        events.sort_by_key(|event| event.id.seq);
        Ok(Replay::Complete { events, head })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<u64>>);

    impl LiveSink for Recorder {
        fn deliver(&self, event: &Arc<Event>) {
            self.0.lock().expect("lock").push(event.id.seq);
        }

        // The memory bus's history only changes with the process.
        fn history_changed(&self) {}

        // The memory bus delivers in one order: it never reports progress.
        fn progress(&self, _target: &Target, _through: EventId) {}
    }

    fn bus(settings: MemoryBusSettings) -> (MemoryBus, Arc<Recorder>) {
        let recorder = Arc::new(Recorder::default());
        (MemoryBus::new(&settings, recorder.clone()), recorder)
    }

    fn publish_to(target: &Target, data: &str, msg_id: Option<&str>) -> PublishRequest {
        PublishRequest {
            target: target.clone(),
            event_type: None,
            data: data.into(),
            msg_id: msg_id.map(str::to_owned),
            trace: None,
        }
    }

    fn seqs(replay: Replay) -> Vec<u64> {
        match replay {
            Replay::Complete { events, .. } => events.iter().map(|e| e.id.seq).collect(),
            Replay::HistoryLost { reason, .. } => panic!("history lost: {reason:?}"),
        }
    }

    fn lost_reason(replay: Replay) -> LostReason {
        match replay {
            Replay::HistoryLost { reason, .. } => reason,
            Replay::Complete { .. } => panic!("replay was complete"),
        }
    }

    #[tokio::test]
    async fn sequences_increase_and_every_event_reaches_the_sink_in_order() {
        let (bus, recorder) = bus(MemoryBusSettings::default());
        let alice = Target::user("alice").expect("valid");
        for i in 0..5 {
            let receipt = bus
                .publish(publish_to(&alice, "x", None))
                .await
                .expect("stored");
            assert_eq!(receipt.id.seq, i + 1);
        }
        assert_eq!(*recorder.0.lock().expect("lock"), vec![1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn replay_returns_only_the_requested_targets_after_the_position() {
        let (bus, _) = bus(MemoryBusSettings::default());
        let alice = Target::user("alice").expect("valid");
        let bob = Target::user("bob").expect("valid");
        let news = Target::topic("news").expect("valid");
        for target in [&alice, &bob, &news, &alice, &bob, &news] {
            bus.publish(publish_to(target, "x", None))
                .await
                .expect("stored");
        }
        let from = EventId {
            epoch: bus.epoch(),
            seq: 1,
        };
        let replay = bus
            .replay(
                &[alice.clone(), news.clone()],
                &StreamPosition::at(from, 2),
                100,
            )
            .await
            .expect("read");
        assert_eq!(seqs(replay), vec![3, 4, 6]);
    }

    #[tokio::test]
    async fn a_retry_with_the_same_msg_id_is_stored_once() {
        let (bus, recorder) = bus(MemoryBusSettings::default());
        let alice = Target::user("alice").expect("valid");
        let first = bus
            .publish(publish_to(&alice, "x", Some("m1")))
            .await
            .expect("stored");
        let retry = bus
            .publish(publish_to(&alice, "x", Some("m1")))
            .await
            .expect("stored");
        assert_eq!(
            retry,
            Receipt {
                id: first.id,
                duplicate: true
            }
        );
        assert_eq!(recorder.0.lock().expect("lock").len(), 1);
    }

    #[tokio::test]
    async fn evicted_history_another_epoch_or_a_future_id_mean_history_lost() {
        let (bus, _) = bus(MemoryBusSettings {
            max_events: 3,
            ..Default::default()
        });
        let alice = Target::user("alice").expect("valid");
        for _ in 0..5 {
            bus.publish(publish_to(&alice, "x", None))
                .await
                .expect("stored");
        }
        let targets = [alice];
        let at = |seq| {
            StreamPosition::at(
                EventId {
                    epoch: bus.epoch(),
                    seq,
                },
                1,
            )
        };
        // Events 1 and 2 were evicted: resuming after 0 or 1 cannot be complete.
        assert_eq!(
            lost_reason(bus.replay(&targets, &at(1), 100).await.expect("read")),
            LostReason::Expired
        );
        // Resuming after 2 needs 3, 4, 5: all still there.
        assert_eq!(
            seqs(bus.replay(&targets, &at(2), 100).await.expect("read")),
            vec![3, 4, 5]
        );
        assert_eq!(
            lost_reason(bus.replay(&targets, &at(9), 100).await.expect("read")),
            LostReason::UnknownPosition
        );
        let other_epoch = StreamPosition {
            epoch: Epoch(bus.epoch().0 + 1),
            seqs: vec![2],
        };
        assert_eq!(
            lost_reason(bus.replay(&targets, &other_epoch, 100).await.expect("read")),
            LostReason::EpochChanged
        );
        assert_eq!(
            lost_reason(bus.replay(&targets, &at(2), 2).await.expect("read")),
            LostReason::TooFarBehind
        );
    }

    #[tokio::test]
    async fn the_byte_limit_evicts_the_oldest_events_and_refuses_an_event_larger_than_it() {
        let (bus, _) = bus(MemoryBusSettings {
            max_bytes: 200,
            ..Default::default()
        });
        let alice = Target::user("alice").expect("valid");
        for _ in 0..10 {
            bus.publish(publish_to(&alice, &"x".repeat(40), None))
                .await
                .expect("stored");
        }
        let kept = {
            let history = bus.lock();
            assert!(history.bytes <= 200, "{} bytes kept", history.bytes);
            assert_eq!(history.last_seq, 10);
            let stored: usize = history.events.iter().map(|s| s.event.frame.len()).sum();
            assert_eq!(history.bytes, stored, "the byte count follows eviction");
            history.events.len() as u64
        };
        // Everything still stored replays, through the target's chain.
        let first = 10 - kept + 1;
        let from = StreamPosition::at(
            EventId {
                epoch: bus.epoch(),
                seq: first - 1,
            },
            1,
        );
        let replay = bus.replay(std::slice::from_ref(&alice), &from, 100).await;
        assert_eq!(
            seqs(replay.expect("read")),
            (first..=10).collect::<Vec<_>>()
        );
        let err = bus
            .publish(publish_to(&alice, &"x".repeat(300), None))
            .await;
        assert!(matches!(err, Err(PublishError::TooLarge { .. })));
    }

    #[tokio::test]
    async fn replay_after_eviction_returns_each_targets_stored_events_in_order() {
        let (bus, _) = bus(MemoryBusSettings {
            max_events: 7,
            ..Default::default()
        });
        let alice = Target::user("alice").expect("valid");
        let bob = Target::user("bob").expect("valid");
        let carol = Target::user("carol").expect("valid");
        // 1 a, 2 b, 3 c, 4 a, 5 a, 6 b, 7 a, 8 b, 9 a, 10 a: 1..=3 evicted,
        // carol's only event with them.
        for target in [
            &alice, &bob, &carol, &alice, &alice, &bob, &alice, &bob, &alice, &alice,
        ] {
            bus.publish(publish_to(target, "x", None))
                .await
                .expect("stored");
        }
        let from = |seqs: Vec<u64>| StreamPosition {
            epoch: bus.epoch(),
            seqs,
        };
        let replay = |targets: Vec<Target>, seqs: Vec<u64>| {
            let from = from(seqs);
            let bus = &bus;
            async move { bus.replay(&targets, &from, 100).await.expect("read") }
        };
        assert_eq!(
            seqs(replay(vec![alice.clone()], vec![3]).await),
            vec![4, 5, 7, 9, 10]
        );
        assert_eq!(
            seqs(replay(vec![alice.clone()], vec![7]).await),
            vec![9, 10]
        );
        assert_eq!(seqs(replay(vec![bob.clone()], vec![3]).await), vec![6, 8]);
        // carol's event is gone and nothing came after it.
        assert_eq!(
            seqs(replay(vec![carol.clone()], vec![3]).await),
            Vec::<u64>::new()
        );
        assert_eq!(
            seqs(replay(vec![carol, bob.clone(), alice.clone()], vec![3, 6, 9]).await),
            vec![8, 10]
        );
        // The limit counts the events of every target together.
        let too_many = bus
            .replay(&[alice, bob], &from(vec![3, 3]), 6)
            .await
            .expect("read");
        assert_eq!(lost_reason(too_many), LostReason::TooFarBehind);
    }

    #[tokio::test]
    async fn targets_whose_events_were_all_evicted_are_swept_out() {
        let max_events = 10;
        let (bus, _) = bus(MemoryBusSettings {
            max_events,
            ..Default::default()
        });
        let publishes = 3 * (PRUNE_FLOOR + 2 * max_events) as u64;
        for i in 0..publishes {
            let target = Target::user(format!("user-{i}")).expect("valid");
            bus.publish(publish_to(&target, "x", None))
                .await
                .expect("stored");
            let history = bus.lock();
            assert!(
                history.last_of.len() <= PRUNE_FLOOR + 2 * max_events,
                "{} target entries for {} stored events",
                history.last_of.len(),
                history.events.len()
            );
        }
        // The latest targets still replay; the swept ones replay nothing.
        let last = Target::user(format!("user-{}", publishes - 1)).expect("valid");
        let first = Target::user("user-0").expect("valid");
        let from = StreamPosition {
            epoch: bus.epoch(),
            seqs: vec![publishes - 5, publishes - 5],
        };
        let replay = bus.replay(&[last, first], &from, 100).await;
        assert_eq!(seqs(replay.expect("read")), vec![publishes]);
    }

    #[test]
    fn a_msg_id_is_remembered_for_the_duplicate_window_and_then_forgotten() {
        let window = Duration::from_secs(120);
        let start = Instant::now();
        let mut recent = RecentIds::default();
        recent.insert("m1".into(), 1, start);
        recent.insert("m2".into(), 2, start + Duration::from_secs(60));
        assert_eq!(recent.get("m1"), Some(1));
        assert_eq!(recent.get("m3"), None);
        recent.expire(window, start + window);
        assert_eq!(recent.get("m1"), Some(1), "still inside the window");
        recent.expire(window, start + window + Duration::from_secs(1));
        assert_eq!(recent.get("m1"), None, "expired");
        assert_eq!(recent.get("m2"), Some(2));
        assert_eq!(recent.len(), 1);
        // Once forgotten the id can be stored again, under its new sequence,
        // and the earlier expiry does not remove the new entry.
        recent.insert("m1".into(), 3, start + Duration::from_secs(122));
        recent.expire(window, start + Duration::from_secs(181));
        assert_eq!(recent.get("m2"), None);
        assert_eq!(recent.get("m1"), Some(3));
        recent.expire(window, start + Duration::from_secs(243));
        assert_eq!(recent.len(), 0);
    }

    #[tokio::test]
    async fn a_retry_after_the_event_was_evicted_is_still_a_duplicate() {
        let (bus, recorder) = bus(MemoryBusSettings {
            max_events: 2,
            ..Default::default()
        });
        let alice = Target::user("alice").expect("valid");
        let first = bus
            .publish(publish_to(&alice, "x", Some("m1")))
            .await
            .expect("stored");
        for _ in 0..3 {
            bus.publish(publish_to(&alice, "y", None))
                .await
                .expect("stored");
        }
        let retry = bus
            .publish(publish_to(&alice, "x", Some("m1")))
            .await
            .expect("answered");
        assert_eq!(
            retry,
            Receipt {
                id: first.id,
                duplicate: true
            }
        );
        assert_eq!(recorder.0.lock().expect("lock").len(), 4);
    }
}
