//! Live delivery: every followed target's republished messages, handed to the
//! sink in stream order across all targets.
//!
//! Each followed target has its own core NATS subscription (interest-based
//! fan-out: a node only receives what its connections follow). async-nats reads
//! the connection in one task and pushes every message into its subscription's
//! channel as it arrives, so the channels together hold the messages in arrival
//! order, which is stream order: the stream republishes in sequence order. A
//! task per target would lose that order (target A's task may run after B's),
//! and a client following both could be written B's 10 before A's 9 and resume
//! past 9. So one dispatcher owns every subscription and delivers in rounds:
//!
//! 1. drain every subscription whose channel woke (pass one). The highest
//!    sequence in hand is the round's **bound**: every message this node
//!    received before it has been drained or sits in a channel that woke;
//! 2. drain again (pass two): now every message received before the bound is
//!    in hand;
//! 3. fill the gaps the messages reveal (`Nats-Last-Sequence` above what the
//!    target delivered: a republished copy went missing) from the stream,
//!    sort, deliver everything up to the bound. Messages above it wait for the
//!    next round, where they are the bound.
//!
//! After a reconnect (copies republished while disconnected are gone), a
//! slow-consumer drop, or a change of the stream's leader (a leader that
//! stepped down or died may not have sent the copies of what it stored last,
//! and the new one never sends them; this node's own connection may never
//! have dropped), every target is filled from the stream up to its last
//! sequence, read after the event: the reply to that read arrives behind the
//! republished copies up to it, so pass two has every live message the fill
//! could be overtaken by. Nothing read on a new connection is delivered
//! before the node has checked the stream's history (it may have come back
//! shorter, see `history`): a round that drained a message from a connection
//! it has not followed yet holds everything until then. The client numbers
//! its connections before reading from them, so the round cannot miss one;
//! the event callback reporting the reconnect may run after such a round.
//!
//! A leader change is learned from JetStream's `LEADER_ELECTED` advisory and
//! checked for right after pass one, before the round decides whether to
//! fill. Without it, a target whose last copy was lost would be filled only
//! when its next event came, seconds later, after other targets' later
//! events had been written (found by the `mixed-targets` chaos scenario: a
//! client resuming in between skipped the lost event). It narrows that
//! window to milliseconds but does not close it: the new leader may apply,
//! and republish, entries left from the old leader's term before it sends
//! the advisory, and an event of another target republished then can still
//! go out ahead of the lost one (docs/reliability.md, "Not covered yet").

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, SystemTime};

use futures_util::{StreamExt, stream};
use herald_protocol::Target;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{Shared, lock};
use crate::bus::{Event, FollowState};

/// How many gaps are filled from the stream at once (requests to its leader).
const FILLS_IN_FLIGHT: usize = 32;

/// Entries a round buffer keeps between rounds: enough for steady traffic;
/// the burst after an outage (every target's missed events) gets its memory
/// back afterwards instead of holding it as a high-water mark.
const ROUND_BUFFER_KEEP: usize = 256;

/// Rounds run back to back before the dispatcher yields its worker thread.
const ROUNDS_BEFORE_YIELD: u32 = 16;

/// Longest wait before retrying a round that could not read the stream.
const MAX_RETRY: Duration = Duration::from_secs(2);

/// The ready-queue key of the leader advisories (follow keys start at 1).
const LEADER_CHANGES: u64 = 0;

/// What the bus asks of the dispatcher.
pub(super) enum Command {
    /// Deliver `target` from `subscription` on; everything up to `last` on its
    /// subject (read in history `generation`) is the replay's business.
    /// Ignored unless `key` is still the target's current follow.
    Adopt {
        key: u64,
        target: Target,
        subscription: async_nats::Subscriber,
        last: u64,
        generation: u64,
        state: watch::Sender<FollowState>,
    },
    /// Stop delivering the follow `key` (unsubscribes).
    Release { key: u64 },
}

/// One followed target.
struct Slot {
    target: Target,
    /// The subject its events are stored under.
    stored: String,
    subscription: async_nats::Subscriber,
    /// The last sequence delivered (or known to be the replay's).
    last: u64,
    waker: Arc<SlotWaker>,
}

/// Subscriptions whose channels woke since the dispatcher last drained them.
#[derive(Default)]
struct ReadyQueue {
    keys: Mutex<Vec<u64>>,
    notify: Notify,
}

/// Queues its slot when the slot's channel receives a message.
struct SlotWaker {
    key: u64,
    queued: AtomicBool,
    ready: Arc<ReadyQueue>,
}

impl Wake for SlotWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::AcqRel) {
            lock(&self.ready.keys).push(self.key);
            self.ready.notify.notify_one();
        }
    }
}

/// A republished message in hand.
struct Received {
    key: u64,
    seq: u64,
    /// `Nats-Last-Sequence`: the previous sequence stored on the same subject.
    previous: u64,
    stored_at: Option<SystemTime>,
    message: async_nats::Message,
}

/// Something to deliver, in sequence order.
enum Delivery {
    Live(Received),
    Filled { key: u64, event: Event },
}

impl Delivery {
    fn seq(&self) -> u64 {
        match self {
            Delivery::Live(received) => received.seq,
            Delivery::Filled { event, .. } => event.id.seq,
        }
    }
}

/// A target's stored events to fetch: after `after`, before `before`.
struct Gap {
    key: u64,
    subject: String,
    after: u64,
    before: u64,
}

/// The node's live dispatcher; see the module docs.
pub(super) struct Dispatcher {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Republished copies may have been lost (slow consumer): fill every target.
    lost: Arc<Notify>,
    /// The stream's `LEADER_ELECTED` advisories: fill every target.
    leader_changes: async_nats::Subscriber,
    leader_waker: Arc<SlotWaker>,
    slots: HashMap<u64, Slot>,
    ready: Arc<ReadyQueue>,
    /// Received, not yet delivered (above the last round's bound).
    pending: Vec<Received>,
    /// Buffers reused by every round: what a round delivers, the slots being
    /// drained, each target's last sequence while looking for gaps.
    deliveries: Vec<Delivery>,
    draining: Vec<u64>,
    scratch: HashMap<u64, u64>,
    /// Every target must be filled from the stream before the next delivery.
    resync: bool,
    /// The NATS connection whose messages may be delivered (its history was
    /// checked; see [`Dispatcher::follow_connection`]).
    connection: u64,
    stop: CancellationToken,
}

/// Why a round delivered nothing; what it drained waits for the next one.
enum Held {
    /// The stream could not be read (a gap fill, its state).
    Unreadable(String),
    /// Messages from a NATS connection the dispatcher has not followed yet.
    NewConnection,
}

impl Dispatcher {
    pub(super) fn new(
        shared: Arc<Shared>,
        commands: mpsc::UnboundedReceiver<Command>,
        lost: Arc<Notify>,
        leader_changes: async_nats::Subscriber,
        stop: CancellationToken,
    ) -> Self {
        let connection = shared.connection();
        let ready: Arc<ReadyQueue> = Arc::default();
        let leader_waker = Arc::new(SlotWaker {
            key: LEADER_CHANGES,
            queued: AtomicBool::new(false),
            ready: Arc::clone(&ready),
        });
        // Polled once so that an advisory wakes the dispatcher.
        leader_waker.wake_by_ref();
        Dispatcher {
            shared,
            commands,
            lost,
            leader_changes,
            leader_waker,
            slots: HashMap::new(),
            ready,
            pending: Vec::new(),
            deliveries: Vec::new(),
            draining: Vec::new(),
            scratch: HashMap::new(),
            resync: false,
            connection,
            stop,
        }
    }

    /// Runs until `stop`. Polls the subscriptions' channels directly, so it
    /// must run unconstrained by tokio's cooperative budget (a budget-exhausted
    /// channel would answer "empty" and break the rounds' reasoning); it
    /// yields its thread itself, every [`ROUNDS_BEFORE_YIELD`] rounds run
    /// back to back.
    pub(super) async fn run(mut self) {
        let shared = Arc::clone(&self.shared);
        let mut reconnects = shared.reconnects.subscribe();
        reconnects.mark_unchanged();
        let mut generations = shared.history.generations();
        generations.mark_unchanged();
        let mut retry = Duration::from_millis(50);
        let mut rounds_without_wait = 0;
        loop {
            let busy = !self.pending.is_empty() || self.resync;
            let ready = Arc::clone(&self.ready);
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return,
                changed = generations.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.restart_from_new_history().await;
                    continue;
                }
                changed = reconnects.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    if !self.follow_connection(&generations).await {
                        return;
                    }
                    continue;
                }
                _ = self.lost.notified() => {
                    tracing::warn!("NATS dropped live messages (slow consumer); filling every followed target from the stream");
                    self.resync = true;
                }
                command = self.commands.recv() => match command {
                    Some(command) => self.handle(command),
                    None => return,
                },
                _ = ready.notify.notified() => {}
                _ = std::future::ready(()), if busy => {}
            }
            while let Ok(command) = self.commands.try_recv() {
                self.handle(command);
            }
            match self.round().await {
                Ok(()) => retry = Duration::from_millis(50),
                Err(Held::NewConnection) => {
                    if !self.follow_connection(&generations).await {
                        return;
                    }
                }
                Err(Held::Unreadable(err)) => {
                    tracing::warn!(error = %err, retry_ms = retry.as_millis() as u64, "cannot read the stream to deliver live events in order; retrying");
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(retry) => {}
                    }
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
            // The select above only waits when there is nothing to do; under
            // a steady flow it never does, so give the worker thread back
            // every few rounds.
            rounds_without_wait += 1;
            if !self.pending.is_empty() || !lock(&self.ready.keys).is_empty() {
                if rounds_without_wait >= ROUNDS_BEFORE_YIELD {
                    rounds_without_wait = 0;
                    tokio::task::yield_now().await;
                }
            } else {
                rounds_without_wait = 0;
            }
        }
    }

    /// Moves on to the current NATS connection, if it is a new one.
    /// Republished messages sent while disconnected are lost, and the stream
    /// may have come back with a shorter history (stores restored from an
    /// older copy): waits until the node has checked it, then fills every
    /// target from the stream. Filling from a history that went back, or
    /// delivering what the new connection brings before the check, would send
    /// other events under ids already sent or skip lost ones silently.
    /// Returns `false` when stopped.
    async fn follow_connection(&mut self, generations: &watch::Receiver<u64>) -> bool {
        let connection = self.shared.connection();
        if connection == self.connection {
            return true;
        }
        // The check runs when the event callback reports the connection,
        // after it reported the disconnection (which set the checkpoint).
        if !self
            .shared
            .history
            .checked_after(connection, &self.stop)
            .await
        {
            return false;
        }
        self.connection = connection;
        // A changed history restarts every target instead (next select).
        if !generations.has_changed().unwrap_or(false) {
            self.resync = true;
        }
        true
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Adopt {
                key,
                target,
                subscription,
                last,
                generation,
                state,
            } => {
                if !self.shared.is_current_follow(&target, key) {
                    return;
                }
                if generation != self.shared.history.generation() {
                    // `last` was read from a history that has since changed:
                    // it may be past events the new one will reuse. The
                    // stream retries (200 and `retry:`) and follows afresh.
                    let _ = state.send(FollowState::Failed(
                        "the stream's history changed while following".into(),
                    ));
                    return;
                }
                let waker = Arc::new(SlotWaker {
                    key,
                    queued: AtomicBool::new(false),
                    ready: Arc::clone(&self.ready),
                });
                let stored = target.subject(&self.shared.settings.subject_prefix);
                self.slots.insert(
                    key,
                    Slot {
                        target,
                        stored,
                        subscription,
                        last,
                        waker: Arc::clone(&waker),
                    },
                );
                // Messages that arrived before adoption are drained next pass.
                waker.wake_by_ref();
                let _ = state.send(FollowState::Ready);
            }
            Command::Release { key } => {
                self.slots.remove(&key);
            }
        }
    }

    /// One round: drain, bound, drain, fill, deliver up to the bound.
    async fn round(&mut self) -> Result<(), Held> {
        self.drain();
        // After pass one: an advisory that arrived before anything pass one
        // drained is in its channel now (async-nats fills the channels in
        // arrival order).
        self.follow_leader_changes();
        let mut bound = self.pending.iter().map(|r| r.seq).max().unwrap_or(0);
        let mut gaps = Vec::new();
        let resync_head = if self.resync {
            if !self.shared.history_checked_now() {
                return Err(Held::Unreadable(
                    "the stream's history is being checked after a reconnect".into(),
                ));
            }
            let head = self
                .shared
                .state()
                .await
                .map_err(|err| Held::Unreadable(err.0))?
                .last_sequence;
            bound = bound.max(head);
            gaps.extend(self.slots.iter().map(|(&key, slot)| Gap {
                key,
                subject: slot.stored.clone(),
                after: slot.last,
                before: head + 1,
            }));
            Some(head)
        } else {
            None
        };
        self.drain();

        self.pending.sort_unstable_by_key(|received| received.seq);
        let due = self
            .pending
            .partition_point(|received| received.seq <= bound);
        let mut deliveries = std::mem::take(&mut self.deliveries);
        deliveries.extend(self.pending.drain(..due).map(Delivery::Live));
        self.revealed_gaps(&deliveries, resync_head, &mut gaps);
        match self.fill(gaps).await {
            Ok(filled) if filled.is_empty() => {}
            Ok(filled) => {
                deliveries.extend(filled);
                deliveries.sort_by_key(Delivery::seq);
            }
            Err(err) => {
                self.hold(deliveries);
                return Err(Held::Unreadable(err));
            }
        }
        // Read after draining and reading: a message drained from a newer
        // connection, or a read it answered, shows here.
        if self.shared.connection() != self.connection {
            self.hold(deliveries);
            return Err(Held::NewConnection);
        }
        self.resync = false;
        for delivery in deliveries.drain(..) {
            self.deliver(delivery);
        }
        deliveries.shrink_to(ROUND_BUFFER_KEEP);
        self.deliveries = deliveries;
        self.pending.shrink_to(ROUND_BUFFER_KEEP);
        self.scratch.shrink_to(ROUND_BUFFER_KEEP);
        self.draining.shrink_to(ROUND_BUFFER_KEEP);
        Ok(())
    }

    /// Ends a round without delivering: its live messages wait for the next
    /// one, which reads the stream again.
    fn hold(&mut self, mut deliveries: Vec<Delivery>) {
        self.pending
            .extend(deliveries.drain(..).filter_map(|delivery| match delivery {
                Delivery::Live(received) => Some(received),
                Delivery::Filled { .. } => None,
            }));
        self.deliveries = deliveries;
    }

    /// Takes every leader advisory waiting: a new leader means every target
    /// is filled from the stream before the next delivery.
    fn follow_leader_changes(&mut self) {
        // Cleared before polling: an advisory arriving from now on wakes
        // the dispatcher again.
        self.leader_waker.queued.store(false, Ordering::Release);
        let waker = Waker::from(Arc::clone(&self.leader_waker));
        let mut cx = Context::from_waker(&waker);
        while let Poll::Ready(Some(advisory)) = self.leader_changes.poll_next_unpin(&mut cx) {
            let leader = serde_json::from_slice::<serde_json::Value>(&advisory.payload)
                .ok()
                .and_then(|a| a["leader"].as_str().map(str::to_owned))
                .unwrap_or_default();
            tracing::info!(%leader, "the stream has a new leader; filling every followed target from the stream");
            self.shared.metrics.stream_leader_changes.inc();
            self.resync = true;
        }
    }

    /// Takes every message waiting in a woken subscription's channel.
    fn drain(&mut self) {
        let mut keys = std::mem::take(&mut self.draining);
        std::mem::swap(&mut keys, &mut *lock(&self.ready.keys));
        for key in keys.drain(..) {
            let Some(slot) = self.slots.get_mut(&key) else {
                continue;
            };
            // Cleared before polling: a message arriving from now on queues
            // the slot again.
            slot.waker.queued.store(false, Ordering::Release);
            let waker = Waker::from(Arc::clone(&slot.waker));
            let mut cx = Context::from_waker(&waker);
            loop {
                match slot.subscription.poll_next_unpin(&mut cx) {
                    Poll::Ready(Some(message)) => {
                        if let Some(received) = received(&self.shared, key, message) {
                            self.pending.push(received);
                        }
                    }
                    Poll::Ready(None) => {
                        tracing::warn!(target = %slot.target, "the live subscription ended; the target is no longer delivered live");
                        self.slots.remove(&key);
                        break;
                    }
                    Poll::Pending => break,
                }
            }
        }
        self.draining = keys;
    }

    /// Adds the gaps the sorted live messages reveal: a message whose
    /// subject's previous sequence is above what its target delivered.
    fn revealed_gaps(
        &mut self,
        deliveries: &[Delivery],
        resync_head: Option<u64>,
        gaps: &mut Vec<Gap>,
    ) {
        let last = &mut self.scratch;
        last.clear();
        for delivery in deliveries {
            let Delivery::Live(received) = delivery else {
                continue;
            };
            let Some(slot) = self.slots.get(&received.key) else {
                continue;
            };
            let last = last
                .entry(received.key)
                .or_insert_with(|| slot.last.max(resync_head.unwrap_or(0)));
            if received.seq > *last && received.previous > *last {
                gaps.push(Gap {
                    key: received.key,
                    subject: slot.stored.clone(),
                    after: *last,
                    before: received.seq,
                });
            }
            *last = (*last).max(received.seq);
        }
    }

    /// Reads the gaps' events from the stream, a few requests at a time.
    async fn fill(&self, gaps: Vec<Gap>) -> Result<Vec<Delivery>, String> {
        if gaps.is_empty() {
            return Ok(Vec::new());
        }
        let shared = &self.shared;
        let results: Vec<Result<(Gap, Vec<Event>), String>> = stream::iter(gaps)
            .map(|gap| async move {
                let events = shared
                    .stored_after(&gap.subject, gap.after, gap.before, usize::MAX - 1)
                    .await?;
                Ok((gap, events))
            })
            .buffer_unordered(FILLS_IN_FLIGHT)
            .collect()
            .await;
        let mut filled = Vec::new();
        for result in results {
            let (gap, events) = result?;
            if events.is_empty() {
                continue;
            }
            shared.metrics.gap_repairs.inc();
            shared
                .tracing
                .gap_repaired(&gap.subject, gap.after, events.len());
            tracing::info!(subject = %gap.subject, from = gap.after, events = events.len(), "filled a live gap from the stream");
            filled.extend(events.into_iter().map(|event| Delivery::Filled {
                key: gap.key,
                event,
            }));
        }
        Ok(filled)
    }

    /// Hands one event to the sink unless its target already had it.
    fn deliver(&mut self, delivery: Delivery) {
        let shared = &self.shared;
        match delivery {
            Delivery::Live(received) => {
                let Some(slot) = self.slots.get_mut(&received.key) else {
                    return;
                };
                // Not delivered when suspicious: the history check decides
                // (and ends every stream if the history changed).
                if shared.history.suspicious(received.seq, received.stored_at)
                    || received.seq <= slot.last
                {
                    return;
                }
                slot.last = received.seq;
                let message = received.message;
                let published_at = received.stored_at.unwrap_or_else(SystemTime::now);
                if let Some(event) = shared.decode(
                    &slot.stored,
                    received.seq,
                    message.headers.as_ref(),
                    &message.payload,
                    published_at,
                ) {
                    shared.deliver(event);
                }
            }
            Delivery::Filled { key, event } => {
                let Some(slot) = self.slots.get_mut(&key) else {
                    return;
                };
                if event.id.seq <= slot.last {
                    return;
                }
                slot.last = event.id.seq;
                shared
                    .history
                    .delivered(event.id.seq, Some(event.published_at));
                shared.deliver(event);
            }
        }
    }

    /// The history changed: positions in the old one mean nothing in the new
    /// one. Every target continues from the new history's last sequence
    /// (every stream on the node is ending anyway); what was received but not
    /// delivered belongs to the old history's reading and is dropped.
    async fn restart_from_new_history(&mut self) {
        self.drain();
        self.pending.clear();
        let head = loop {
            match self.shared.state().await {
                Ok(state) => break state.last_sequence,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot read the new history's position yet");
                    tokio::select! {
                        _ = self.stop.cancelled() => return,
                        _ = tokio::time::sleep(MAX_RETRY) => {}
                    }
                }
            }
        };
        for slot in self.slots.values_mut() {
            slot.last = head;
        }
    }
}

/// Reads a republished message's sequence headers; one without them is
/// counted, logged and dropped.
fn received(shared: &Shared, key: u64, message: async_nats::Message) -> Option<Received> {
    shared.metrics.bus_messages_received.inc();
    let headers = message.headers.as_ref();
    let number = |name: &str| {
        headers
            .and_then(|h| h.get(name))
            .and_then(|v| v.as_str().parse::<u64>().ok())
    };
    let Some(seq) = number("Nats-Sequence") else {
        shared.metrics.bus_bad_events.inc();
        tracing::warn!(subject = %message.subject, "live message without Nats-Sequence; dropped");
        return None;
    };
    let previous = number("Nats-Last-Sequence").unwrap_or(0);
    let stored_at: Option<SystemTime> = headers
        .and_then(|h| h.get("Nats-Time-Stamp"))
        .and_then(|v| {
            time::OffsetDateTime::parse(v.as_str(), &time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map(Into::into);
    shared.history.seen(seq);
    Some(Received {
        key,
        seq,
        previous,
        stored_at,
        message,
    })
}
