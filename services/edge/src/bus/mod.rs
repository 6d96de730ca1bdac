//! The event bus: where events are stored, sequenced and fanned out.
//!
//! A [`Bus`] does four things for the edge:
//! - **publish**: store an event for a [`Target`], assign its sequence (the SSE
//!   id), deduplicate publisher retries by `msg_id`;
//! - **follow / unfollow**: start or stop live delivery of a target's events to
//!   this node's [`LiveSink`] (the registry). Interest is per node, not per
//!   connection: the registry follows a target when its first local connection
//!   arrives and unfollows it after the last one leaves;
//! - **replay**: read a set of targets' events after a position, in sequence
//!   order, or say explicitly that the history needed is gone;
//! - **head**: the current position, so a fresh stream can hand its client a
//!   resume point before any event arrives.
//!
//! Implementations: [`memory::MemoryBus`] (embedded, single node) and
//! [`nats::NatsBus`] (NATS JetStream, many nodes).

pub(crate) mod memory;
pub(crate) mod nats;

use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use herald_protocol::{Epoch, EventId, EventType, StreamPosition, Target, TraceParent, sse};
use tokio::sync::watch;

/// One stored event, with its SSE frame encoded once for every connection.
#[derive(Debug, Clone)]
pub(crate) struct Event {
    /// Epoch and stream sequence: the SSE id.
    pub(crate) id: EventId,
    /// Who the event is for.
    pub(crate) target: Target,
    /// The SSE event type, if any.
    pub(crate) event_type: Option<EventType>,
    /// The complete SSE frame (`id:`, `event:`, `data:` lines, blank line).
    pub(crate) frame: Bytes,
    /// Where the frame's `id:` line ends: a stream that writes an id of its
    /// own (one position per target) writes the frame from here.
    pub(crate) body_at: usize,
    /// When the bus stored the event.
    pub(crate) published_at: SystemTime,
    /// The publisher's trace context, when it sent one.
    pub(crate) trace: Option<TraceParent>,
}

impl Event {
    /// Builds an event and encodes its frame.
    pub(crate) fn new(
        id: EventId,
        target: Target,
        event_type: Option<EventType>,
        data: &str,
        published_at: SystemTime,
    ) -> Self {
        let mut frame = BytesMut::with_capacity(data.len() + 64);
        sse::write_event(&mut frame, Some(&id), event_type.as_ref(), data);
        // The frame opens with its `id:` line, which holds no other line break.
        let body_at = frame
            .iter()
            .position(|&b| b == b'\n')
            .map_or(0, |at| at + 1);
        Event {
            id,
            target,
            event_type,
            body_at,
            frame: frame.freeze(),
            published_at,
            trace: None,
        }
    }

    /// The frame without its `id:` line.
    pub(crate) fn body(&self) -> &[u8] {
        &self.frame[self.body_at..]
    }

    /// Attaches the publisher's trace context.
    pub(crate) fn with_trace(mut self, trace: Option<TraceParent>) -> Self {
        self.trace = trace;
        self
    }
}

/// What a publisher asks the bus to store.
#[derive(Debug, Clone)]
pub(crate) struct PublishRequest {
    /// The recipient.
    pub(crate) target: Target,
    /// Optional SSE event type.
    pub(crate) event_type: Option<EventType>,
    /// The SSE data, as UTF-8 text.
    pub(crate) data: String,
    /// Idempotency key: a retry with the same key inside the duplicate window
    /// returns the first event's id instead of storing a second event.
    pub(crate) msg_id: Option<String>,
    /// The publisher's trace context, passed on to delivery spans.
    pub(crate) trace: Option<TraceParent>,
}

/// The bus's answer to a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Receipt {
    /// The event's id (the original one for a duplicate).
    pub(crate) id: EventId,
    /// Whether this publish was recognised as a retry of an earlier one.
    pub(crate) duplicate: bool,
}

/// Why a publish failed. When returned, nothing was stored.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishError {
    /// The event is larger than the bus accepts.
    #[error("event is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// Size of the event data in bytes.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A field cannot be carried by the bus (a header value with a line
    /// break); the request must change.
    #[error("{field} cannot be stored: it holds a character the bus cannot carry")]
    Invalid {
        /// The request field.
        field: &'static str,
    },
    /// The bus is not reachable right now; retry later with the same `msg_id`.
    #[error("event bus unavailable: {0}")]
    Unavailable(#[source] async_nats::Error),
}

/// Why history could not be replayed completely.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LostReason {
    /// The id belongs to another incarnation of the history (restarted memory
    /// bus, recreated stream).
    EpochChanged,
    /// Events after the id have been evicted (age, size or count limits).
    Expired,
    /// The id is ahead of anything this history has stored.
    UnknownPosition,
    /// More events are owed than a replay may send (`stream.max_replay_events`).
    TooFarBehind,
    /// The client's `Last-Event-ID` is not an id Herald wrote.
    UnrecognisedId,
    /// The client's `Last-Event-ID` was written for a stream following other
    /// targets (its topics changed): its positions cannot be matched.
    TargetsChanged,
}

impl LostReason {
    /// Stable machine-readable name, sent in `herald.reset` and used in metrics.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LostReason::EpochChanged => "epoch_changed",
            LostReason::Expired => "expired",
            LostReason::UnknownPosition => "unknown_position",
            LostReason::TooFarBehind => "too_far_behind",
            LostReason::UnrecognisedId => "unrecognised_id",
            LostReason::TargetsChanged => "targets_changed",
        }
    }
}

/// The result of a replay request.
#[derive(Debug)]
pub(crate) enum Replay {
    /// Every event after the requested position, in sequence order.
    Complete {
        /// The events, oldest first.
        events: Vec<Arc<Event>>,
        /// The bus position when the replay was read.
        head: EventId,
    },
    /// The bus cannot give everything after the requested position.
    HistoryLost {
        /// Why.
        reason: LostReason,
        /// The bus position when this was decided: the client continues from here.
        head: EventId,
    },
}

/// Why a log holding sequences `first..=last` of `epoch` cannot replay
/// everything after `after`, judged from its bounds alone (`None`: it can, as
/// far as the bounds tell). When events after the position were evicted they
/// may not have been for the client's targets: a needless reset is safe, a
/// silent skip is not.
pub(crate) fn check_position(
    after: EventId,
    epoch: Epoch,
    first: u64,
    last: u64,
) -> Option<LostReason> {
    if after.epoch != epoch {
        Some(LostReason::EpochChanged)
    } else if after.seq > last {
        Some(LostReason::UnknownPosition)
    } else if after.seq + 1 < first {
        Some(LostReason::Expired)
    } else {
        None
    }
}

/// Why a replay or position read failed (the bus was unreachable). Nothing changed.
#[derive(Debug, thiserror::Error)]
#[error("event bus unavailable: {0}")]
pub(crate) struct ReplayError(#[from] pub nats::ReadError);

/// Progress of a follow request.
#[derive(Debug, Clone)]
pub(crate) enum FollowState {
    /// The bus is setting up live delivery.
    Pending,
    /// Live delivery is active: every event stored from now on reaches the sink.
    Ready,
    /// Live delivery could not be set up (shared: every stream waiting on the
    /// follow reads the same error).
    Failed(Arc<nats::FollowError>),
}

/// Where a bus delivers live events: the node's connection registry.
pub(crate) trait LiveSink: Send + Sync {
    /// Called once per event for every followed target, in sequence order per
    /// target. Must not block.
    fn deliver(&self, event: &Arc<Event>);

    /// Every event of `target` up to `through` has been handed to
    /// [`LiveSink::deliver`]: a stream following several targets may move
    /// its position for `target` there (so a quiet target's position keeps
    /// up with the others). Must not block.
    fn progress(&self, target: &Target, through: EventId);

    /// The stored history changed under every followed target (acknowledged
    /// events lost, the stream recreated): ids already sent may now name
    /// other events. Every stream must end and resume, so that its client is
    /// told with one `herald.reset`. Must not block.
    fn history_changed(&self);
}

/// Live-delivery interest: what the registry asks of a bus.
pub(crate) trait Interest: Send + Sync {
    /// Starts live delivery of `target`'s events to the sink. Called by the
    /// registry, under its lock for that target, when the first local connection
    /// arrives; the returned watch turns [`FollowState::Ready`] once no event can
    /// be missed any more.
    fn follow(&self, target: &Target) -> watch::Receiver<FollowState>;

    /// Stops live delivery of `target`; called after its last connection left.
    fn unfollow(&self, target: &Target);
}

/// The event bus, as the edge uses it.
#[async_trait::async_trait]
pub(crate) trait Bus: Interest + std::fmt::Debug {
    /// `memory` or `nats`, for logs.
    fn kind(&self) -> &'static str;

    /// Whether the bus can take publishes and replays right now.
    fn is_ready(&self) -> bool;

    /// Stores an event and delivers it live to the nodes following its target.
    async fn publish(&self, request: PublishRequest) -> Result<Receipt, PublishError>;

    /// The id of the newest event stored (sequence 0 when there is none).
    async fn head(&self) -> Result<EventId, ReplayError>;

    /// Whether live delivery follows one global order across every target
    /// (each event handed to the sink after every older one), so a stream's
    /// newest sequence alone says where it stands in all its targets.
    fn delivers_in_order(&self) -> bool;

    /// The events of each target after its position in `from` (one per
    /// target), in sequence order, at most `limit` of them, or the reason
    /// they cannot all be given.
    async fn replay(
        &self,
        targets: &[Target],
        from: &StreamPosition,
        limit: usize,
    ) -> Result<Replay, ReplayError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(epoch: u64, seq: u64) -> EventId {
        EventId {
            epoch: Epoch(epoch),
            seq,
        }
    }

    #[test]
    fn a_position_inside_the_log_can_be_replayed() {
        assert_eq!(check_position(at(7, 4), Epoch(7), 5, 9), None);
        assert_eq!(check_position(at(7, 9), Epoch(7), 5, 9), None);
        assert_eq!(check_position(at(7, 0), Epoch(7), 0, 0), None, "empty log");
    }

    #[test]
    fn another_epoch_a_future_position_or_an_evicted_one_is_history_lost() {
        assert_eq!(
            check_position(at(6, 4), Epoch(7), 5, 9),
            Some(LostReason::EpochChanged)
        );
        assert_eq!(
            check_position(at(7, 10), Epoch(7), 5, 9),
            Some(LostReason::UnknownPosition)
        );
        assert_eq!(
            check_position(at(7, 3), Epoch(7), 5, 9),
            Some(LostReason::Expired)
        );
    }
}
