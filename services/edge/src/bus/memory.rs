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

use std::collections::{HashMap, VecDeque};
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
#[derive(Default)]
struct History {
    /// The last sequence assigned (0 before the first event).
    last_seq: u64,
    /// Stored events, contiguous in sequence, oldest first, with the instant
    /// each was stored (for age eviction on a monotonic clock).
    events: VecDeque<(Instant, Arc<Event>)>,
    /// Sum of the stored frames' sizes.
    bytes: usize,
    /// Each target's stored sequences, oldest first: a replay reads only its
    /// own targets' events instead of scanning everyone's.
    by_target: HashMap<Target, VecDeque<u64>>,
    /// `msg_id` → sequence, for publishes inside the duplicate window.
    recent_ids: HashMap<String, u64>,
    /// `msg_id`s in the order they were seen, to expire them.
    recent_order: VecDeque<(Instant, String)>,
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
        while let Some((stored, event)) = self.events.front() {
            let too_many = self.events.len() > limits.max_events;
            let too_big = self.bytes > limits.max_bytes;
            let too_old = now.duration_since(*stored) > limits.max_age;
            if !(too_many || too_big || too_old) {
                break;
            }
            self.bytes -= event.frame.len();
            let Some((_, event)) = self.events.pop_front() else {
                break;
            };
            if let Some(seqs) = self.by_target.get_mut(&event.target) {
                seqs.pop_front();
                if seqs.is_empty() {
                    self.by_target.remove(&event.target);
                }
            }
        }
        while let Some((seen, _)) = self.recent_order.front() {
            if now.duration_since(*seen) <= limits.duplicate_window {
                break;
            }
            if let Some((_, msg_id)) = self.recent_order.pop_front() {
                self.recent_ids.remove(&msg_id);
            }
        }
    }

    /// The sequence of the oldest stored event (last + 1 when empty).
    fn first_seq(&self) -> u64 {
        self.events
            .front()
            .map_or(self.last_seq + 1, |(_, event)| event.id.seq)
    }
}

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
            .as_ref()
            .and_then(|msg_id| history.recent_ids.get(msg_id))
        {
            return Ok(Receipt {
                id: self.id(*seq),
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
        history.last_seq = seq;
        history.bytes += event.frame.len();
        // A known target's list is found by reference: no copy of its name.
        match history.by_target.get_mut(&event.target) {
            Some(seqs) => seqs.push_back(seq),
            None => {
                history
                    .by_target
                    .insert(event.target.clone(), VecDeque::from([seq]));
            }
        }
        history.events.push_back((now, Arc::clone(&event)));
        if let Some(msg_id) = request.msg_id {
            history.recent_ids.insert(msg_id.clone(), seq);
            history.recent_order.push_back((now, msg_id));
        }
        history.evict(&self.limits, now);
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
        // Stored sequences are contiguous, so a sequence is an index.
        let mut events = Vec::new();
        for (target, &after) in targets.iter().zip(&from.seqs) {
            let position = EventId {
                epoch: from.epoch,
                seq: after,
            };
            if let Some(reason) = check_position(position, self.epoch, first, history.last_seq) {
                return lost(reason);
            }
            let Some(seqs) = history.by_target.get(target) else {
                continue;
            };
            let start = seqs.partition_point(|&seq| seq <= after);
            for &seq in seqs.range(start..) {
                if events.len() == limit {
                    return lost(LostReason::TooFarBehind);
                }
                let index = usize::try_from(seq - first).unwrap_or(usize::MAX);
                if let Some((_, event)) = history.events.get(index) {
                    events.push(Arc::clone(event));
                }
            }
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
        {
            let history = bus.lock();
            assert!(history.bytes <= 200, "{} bytes kept", history.bytes);
            assert_eq!(history.last_seq, 10);
            let indexed: usize = history.by_target.values().map(VecDeque::len).sum();
            assert_eq!(
                indexed,
                history.events.len(),
                "the per-target index follows eviction"
            );
        }
        let err = bus
            .publish(publish_to(&alice, &"x".repeat(300), None))
            .await;
        assert!(matches!(err, Err(PublishError::TooLarge { .. })));
    }
}
