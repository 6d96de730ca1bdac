//! The live dispatcher: every followed target's republished copies, each
//! delivered only when it connects to the last event delivered for its target.
//!
//! Each followed target has its own core NATS subscription (interest-based
//! fan-out: a node only receives what its connections follow) and its own
//! chain ([`Link`]: the sequence and store time of the last event delivered
//! for it). Every subscription delivers into one shared channel, routed here
//! by subject; one task owns every chain; targets are independent of each
//! other, so a repair of one never holds another back.
//! What decides a delivery is the data (see [`chain`](super::chain)), never
//! when a notification arrives:
//!
//! - a copy that **connects** is delivered; a **duplicate** is dropped;
//! - a **gap** holds the target's copies while its missing events are read
//!   from the stream leader (checking first that the chain's end still
//!   stands), then delivers them and the held copies in order;
//! - a **rewound** copy is confirmed against the stream: if the chain's end no
//!   longer stands, the history went back, the node moves the epoch, ends
//!   every stream (each client is told with one `herald.reset` when it
//!   resumes) and re-anchors every chain in the new history.
//!
//! A lost copy of a target that then stays quiet would never reveal a gap by
//! itself, so the dispatcher also **checks** every target: once per interval,
//! in slices spread over it (see [`sweep`](super::sweep)), and all at once
//! after a reconnect, a slow-consumer drop or a stream leader change. A check
//! is a batched read of the followed subjects' newest stored messages (in
//! most rounds of the periodic check, only of those newer than what the
//! slice's chains were already checked complete through: a quiet target
//! costs no message; see [`sweep`](super::sweep)). A
//! newer one than the chain's end is filled; a chain at the newest message is
//! complete up to the sequence the answer covers, and that is reported to the
//! sink as **progress** (a multi-target stream's id then carries it).
//!
//! A follow is known here before its subscription exists ([`Command::Follow`]):
//! its copies are held until its chain is anchored ([`Command::Anchored`]),
//! then judged like any other. A copy whose subject has no follow (one sent
//! before an unfollow took effect) is dropped. When the shared channel is
//! full the client drops copies and reports a slow consumer, which asks for
//! a check: the copies lost are filled from the stream.
//!
//! The channel is polled here directly, so one task serves every target
//! without a task per target; it runs outside tokio's cooperative budget and
//! yields every [`ROUNDS_BEFORE_YIELD`] rounds (and takes at most
//! [`COPIES_PER_ROUND`] copies a round).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant, SystemTime};

use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use herald_protocol::{Epoch, Target};
use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::chain::{Link, LiveLink, Verdict, judge};
use super::decode::Decoder;
use super::provision::ConnectionEvents;
use super::recent::Recent;
use super::store::{Newest, ReadError, Standing, Store, Stored, parse_time};
use super::sweep::Sweep;
use crate::bus::{Event, FollowState, LiveSink};
use crate::metrics::Metrics;
use crate::telemetry::Tracing;

/// Stream reads in flight at once for repairs (fills, confirmations,
/// re-anchoring): requests to the stream leader.
const READS_IN_FLIGHT: usize = 32;

/// Rounds run back to back before the dispatcher yields its worker thread.
const ROUNDS_BEFORE_YIELD: u32 = 16;

/// Longest wait before retrying a repair that could not read the stream.
const MAX_RETRY: Duration = Duration::from_secs(2);

/// Most live copies taken from the shared channel in one round: a busy
/// channel does not hold back commands, repairs and checks.
const COPIES_PER_ROUND: usize = 4096;

/// What the bus asks of the dispatcher. A follow's commands arrive in the
/// order the follows and releases happened (see [`follow`](super::follow)).
pub(super) enum Command {
    /// `target` is followed as `key`: copies on the `live` subject are its
    /// own, held until its chain is anchored. Sent before the subscription
    /// is made, so its first copy finds its route.
    Follow {
        key: u64,
        target: Target,
        live: Arc<str>,
    },
    /// The follow `key` is subscribed; its chain starts at `anchor` (its
    /// newest stored event, read in `epoch` once the subscription was in
    /// place: what came before is the replay's business). Ignored (which
    /// unsubscribes) when `key` was released meanwhile.
    Anchored {
        key: u64,
        subscription: async_nats::ChannelSubscription,
        epoch: Epoch,
        anchor: Link,
        state: watch::Sender<FollowState>,
    },
    /// Stop delivering the follow `key` (unsubscribes).
    Release { key: u64 },
    /// The follow `key` could not be set up (its stream is told apart).
    SetUpFailed { key: u64 },
    /// The follow `key`'s last stream closed; it is kept for a while:
    /// record what it delivers from now on ([`recent`](super::recent)).
    Linger { key: u64 },
    /// A stream follows the lingering `key` again: `state` turns ready once
    /// it is set up (at once when it is).
    Revive {
        key: u64,
        state: watch::Sender<FollowState>,
    },
    /// What a client at `after` (per follow) in `epoch` missed, from the
    /// recorded events; `None` when they cannot tell.
    Recent {
        asked: Vec<(u64, u64)>,
        epoch: Epoch,
        limit: usize,
        reply: oneshot::Sender<Option<Kept>>,
    },
}

/// An answer from the recorded events: what the client missed of every
/// target asked, oldest first, and the position every target is complete
/// up to for it (live events at or below it are already written).
#[derive(Debug)]
pub(super) struct Kept {
    pub(super) events: Vec<Arc<Event>>,
    pub(super) head: u64,
}

/// One followed target.
struct Followed {
    target: Target,
    /// The subject its live copies come on (its route).
    live: Arc<str>,
    /// `None` until the follow is set up (its copies are held meanwhile);
    /// dropped with the follow, which unsubscribes.
    subscription: Option<async_nats::ChannelSubscription>,
    /// The chain's end: the last event delivered (or the anchor).
    last: Link,
    /// A repair is in flight: live copies wait in `held`, oldest first.
    repairing: bool,
    held: Rarely<(LiveLink, async_nats::Message)>,
    /// The highest position reported to the sink as progress.
    progressed: u64,
    /// A live copy connected to the chain since the periodic check last
    /// came by: the chain was complete up to that copy, so a since round
    /// leaves it out once (see [`Dispatcher::start_check`]).
    connected_since_check: bool,
    /// `false` while the chain waits to be anchored in a new history.
    anchored: bool,
    /// The events delivered since its last stream closed (lingering, or
    /// just followed again); boxed: most follows have none.
    recent: Option<Box<Recent>>,
    /// Streams that followed it again before it was set up.
    waiting: Rarely<watch::Sender<FollowState>>,
}

impl Followed {
    /// Whether its chain stands in the current history (set up, anchored).
    fn chained(&self) -> bool {
        self.subscription.is_some() && self.anchored
    }

    /// The chain was anchored at `anchor` in `epoch`.
    fn anchor_at(&mut self, anchor: Link, epoch: Epoch) {
        self.last = anchor;
        self.progressed = anchor.seq;
        self.anchored = true;
        if let Some(recent) = &mut self.recent {
            recent.anchored(anchor.seq, epoch);
        }
    }

    /// Delivers `event`, which connects to the chain's end (already moved
    /// to it), recording it while the target has a record (a record stays
    /// complete until [`Dispatcher::drop_expired_records`] drops it).
    fn deliver(&mut self, event: Event, sink: &dyn LiveSink) {
        let event = Arc::new(event);
        if let Some(recent) = &mut self.recent {
            recent.delivered(&event);
        }
        sink.deliver(&event);
    }
}

/// A list that is empty nearly always (a follow's held copies, its waiting
/// streams): 8 bytes of every follow until something is put in it, where a
/// `Vec` takes 24 (hence the boxed `Vec`).
#[allow(clippy::box_collection)]
struct Rarely<T>(Option<Box<Vec<T>>>);

impl<T> Default for Rarely<T> {
    fn default() -> Self {
        Rarely(None)
    }
}

impl<T> Rarely<T> {
    fn push(&mut self, item: T) {
        self.0.get_or_insert_with(Box::default).push(item);
    }

    /// Everything in it, oldest first, leaving it empty.
    fn take(&mut self) -> Vec<T> {
        self.0.take().map(|items| *items).unwrap_or_default()
    }

    fn retain(&mut self, keep: impl FnMut(&T) -> bool) {
        if let Some(items) = &mut self.0 {
            items.retain(keep);
            if items.is_empty() {
                self.0 = None;
            }
        }
    }
}

/// Wakes the dispatcher when the shared channel or the leader advisories
/// receive a message (a wake while it works is kept for its next wait).
#[derive(Default)]
struct Rouse {
    notify: tokio::sync::Notify,
}

impl Wake for Rouse {
    fn wake(self: Arc<Self>) {
        self.notify.notify_one();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.notify.notify_one();
    }
}

/// A repair of one target's chain, done with stream reads.
enum Repair {
    /// Read the events after the chain's end up to `through`.
    Fill { after: Link, through: u64 },
    /// Whether the chain's end still stands (a copy looked rewound).
    Confirm { last: Link },
    /// Start the chain again at the subject's newest stored event.
    Anchor,
    /// Try again after a failed read.
    Retry { after: Duration },
}

/// What a finished repair or check brings back.
enum Outcome {
    Filled {
        key: u64,
        through: u64,
        messages: Vec<Stored>,
    },
    Confirmed {
        key: u64,
        standing: Standing,
    },
    Anchored {
        key: u64,
        anchor: Link,
    },
    Retry {
        key: u64,
    },
    Failed {
        key: u64,
        error: ReadError,
    },
    /// A fill found the chain's end gone back: the history was rewound.
    Rewound {
        key: u64,
    },
    /// The periodic check's reading.
    Checked {
        /// Each checked follow and its chain's end, then (in the same
        /// order) the subjects read.
        snapshot: Vec<(u64, Link)>,
        subjects: Vec<String>,
        newest: Result<Newest, ReadError>,
        /// A slice of a since round (its answer sizes the next one's slices).
        since_round: bool,
    },
    /// The epoch was moved after a rewound history (or failed to be).
    EpochMoved(Result<(), ReadError>),
}

/// A finished repair, tagged with the generation it belongs to: repairs
/// started before the chains were re-anchored are ignored.
struct Tagged {
    generation: u64,
    /// The epoch when the repair started: a history found rewound moves the
    /// epoch only if nothing else moved it since.
    epoch: Epoch,
    outcome: Outcome,
}

/// The node's live dispatcher; see the module docs.
pub(super) struct Dispatcher {
    store: Arc<Store>,
    decoder: Arc<Decoder>,
    sink: Arc<dyn LiveSink>,
    metrics: Arc<Metrics>,
    tracing: Arc<Tracing>,
    connection: Arc<ConnectionEvents>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// Every live subscription's copies.
    copies: mpsc::Receiver<async_nats::Message>,
    /// The stream's `LEADER_ELECTED` advisories: check every target.
    leader_changes: async_nats::Subscriber,
    /// Boxed: the table's slots stay small (most of a large table's slots
    /// are empty).
    followed: HashMap<u64, Box<Followed>>,
    /// Live subject → the follow its copies belong to.
    routes: HashMap<Arc<str>, u64>,
    rouse: Arc<Rouse>,
    repairs: FuturesUnordered<BoxFuture<'static, Tagged>>,
    reads: Arc<Semaphore>,
    /// Bumped when every chain starts again (history changed).
    generation: u64,
    /// A check is in flight.
    checking: bool,
    /// Copies may have been lost after the check in flight read its
    /// subjects, or of a target it skipped while a repair was in flight:
    /// check again once it is done.
    check_again: bool,
    /// Checks run because copies were lost (see [`Dispatcher::check_now`]).
    after_loss: bool,
    /// A slice of the periodic round came due while a check was in flight:
    /// it starts once that check is done.
    slice_due: bool,
    /// The periodic check's round over the followed targets.
    sweep: Sweep,
    /// A rewound history was confirmed and the epoch is being moved: every
    /// target holds its copies until its chain is anchored again.
    rewinding: bool,
    /// Most events recorded per lingering target (`nats.linger_max_events`).
    linger_max_events: usize,
    /// Records kept for streams that followed a lingering target again,
    /// with when each is dropped (in that order: the wait is constant).
    kept: VecDeque<(Instant, u64)>,
    stop: CancellationToken,
}

/// How long a lingering target's record is kept once a stream follows it
/// again: its stream asks for it as soon as it is followed.
const KEEP_FOR_RETURNING: Duration = Duration::from_secs(10);

/// Which followed targets a check reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// The next slice of the periodic round.
    Slice,
    /// Every target at once: something may have been lost just now.
    Everything,
}

/// What [`Dispatcher::new`] needs.
pub(super) struct Parts {
    pub(super) store: Arc<Store>,
    pub(super) decoder: Arc<Decoder>,
    pub(super) sink: Arc<dyn LiveSink>,
    pub(super) metrics: Arc<Metrics>,
    pub(super) tracing: Arc<Tracing>,
    pub(super) connection: Arc<ConnectionEvents>,
    pub(super) commands: mpsc::UnboundedReceiver<Command>,
    pub(super) copies: mpsc::Receiver<async_nats::Message>,
    pub(super) leader_changes: async_nats::Subscriber,
    pub(super) check_interval: Duration,
    pub(super) linger_max_events: usize,
    pub(super) stop: CancellationToken,
}

impl Dispatcher {
    pub(super) fn new(parts: Parts) -> Self {
        let rouse: Arc<Rouse> = Arc::default();
        // Polled once so that a copy or an advisory wakes the dispatcher.
        rouse.notify.notify_one();
        let sweep = Sweep::new(parts.store.per_batch(), parts.check_interval);
        Dispatcher {
            store: parts.store,
            decoder: parts.decoder,
            sink: parts.sink,
            metrics: parts.metrics,
            tracing: parts.tracing,
            connection: parts.connection,
            commands: parts.commands,
            copies: parts.copies,
            leader_changes: parts.leader_changes,
            followed: HashMap::new(),
            routes: HashMap::new(),
            rouse,
            repairs: FuturesUnordered::new(),
            reads: Arc::new(Semaphore::new(READS_IN_FLIGHT)),
            generation: 0,
            checking: false,
            check_again: false,
            after_loss: false,
            slice_due: false,
            sweep,
            rewinding: false,
            linger_max_events: parts.linger_max_events,
            kept: VecDeque::new(),
            stop: parts.stop,
        }
    }

    /// Runs until `stop`. Polls the shared channel directly, so it
    /// must run unconstrained by tokio's cooperative budget (a budget-exhausted
    /// channel would answer "empty" while holding a message); it yields its
    /// thread itself.
    pub(super) async fn run(mut self) {
        let mut epochs = self.store.epochs();
        epochs.mark_unchanged();
        let next_slice = tokio::time::sleep(self.sweep.pause(0));
        tokio::pin!(next_slice);
        let connection = Arc::clone(&self.connection);
        let mut rounds_without_wait = 0;
        loop {
            let rouse = Arc::clone(&self.rouse);
            let has_repairs = !self.repairs.is_empty();
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return,
                changed = epochs.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    self.restart_chains();
                }
                command = self.commands.recv() => match command {
                    Some(command) => self.handle(command),
                    None => return,
                },
                Some(tagged) = self.repairs.next(), if has_repairs => self.finish(tagged),
                _ = rouse.notify.notified() => {}
                _ = connection.check_now.notified() => self.check_now(),
                _ = &mut next_slice => {
                    self.drop_expired_records();
                    self.start_check(Check::Slice);
                    let pause = self.sweep.pause(self.followed.len());
                    next_slice.as_mut().reset(tokio::time::Instant::now() + pause);
                }
            }
            while let Ok(command) = self.commands.try_recv() {
                self.handle(command);
            }
            self.take_copies();
            self.follow_leader_changes();
            rounds_without_wait += 1;
            if rounds_without_wait >= ROUNDS_BEFORE_YIELD {
                rounds_without_wait = 0;
                tokio::task::yield_now().await;
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Follow { key, target, live } => {
                self.routes.insert(Arc::clone(&live), key);
                self.followed.insert(
                    key,
                    Box::new(Followed {
                        target,
                        live,
                        subscription: None,
                        last: Link::default(),
                        // Its copies wait for the anchor.
                        repairing: true,
                        held: Rarely::default(),
                        progressed: 0,
                        connected_since_check: false,
                        anchored: true,
                        recent: None,
                        waiting: Rarely::default(),
                    }),
                );
            }
            Command::Anchored {
                key,
                subscription,
                epoch,
                anchor,
                state,
            } => {
                let Some(followed) = self.followed.get_mut(&key) else {
                    // Released meanwhile: dropping the subscription ends it.
                    return;
                };
                followed.subscription = Some(subscription);
                if epoch == self.store.epoch() && followed.anchored {
                    followed.anchor_at(anchor, epoch);
                } else {
                    // The history changed while the anchor was read: anchor
                    // again in the new one.
                    followed.anchored = false;
                }
                let _ = state.send(FollowState::Ready);
                for waiting in followed.waiting.take() {
                    let _ = waiting.send(FollowState::Ready);
                }
                // The copies held since the subscription was made, in order.
                self.release(key, false);
            }
            Command::Release { key } | Command::SetUpFailed { key } => {
                if let Some(followed) = self.followed.remove(&key) {
                    if self.routes.get(&followed.live) == Some(&key) {
                        self.routes.remove(&followed.live);
                    }
                }
            }
            Command::Linger { key } => {
                let epoch = self.store.epoch();
                let rewinding = self.rewinding;
                if let Some(followed) = self.followed.get_mut(&key) {
                    // Not anchored yet: the record starts when it is.
                    let floor = (followed.chained() && !rewinding).then_some(followed.last.seq);
                    followed.recent = Some(Box::new(Recent::starting_at(
                        floor,
                        epoch,
                        self.linger_max_events,
                    )));
                }
            }
            Command::Revive { key, state } => {
                let Some(followed) = self.followed.get_mut(&key) else {
                    // Its set-up failed: dropping `state` tells the stream.
                    return;
                };
                if let Some(recent) = &mut followed.recent {
                    let until = Instant::now() + KEEP_FOR_RETURNING;
                    recent.keep_until(until);
                    self.kept.push_back((until, key));
                }
                if followed.subscription.is_some() {
                    let _ = state.send(FollowState::Ready);
                } else {
                    followed.waiting.push(state);
                }
            }
            Command::Recent {
                asked,
                epoch,
                limit,
                reply,
            } => {
                let _ = reply.send(self.recorded(&asked, epoch, limit));
            }
        }
    }

    /// What a client at `asked`'s positions in `epoch` missed, from the
    /// recorded events (see [`recent`](super::recent)); `None` when any
    /// target's record cannot tell, or it is more than `limit` events.
    fn recorded(&self, asked: &[(u64, u64)], epoch: Epoch, limit: usize) -> Option<Kept> {
        if self.rewinding || epoch != self.store.epoch() {
            return None;
        }
        let mut events = Vec::new();
        let mut head = u64::MAX;
        for &(key, after) in asked {
            let followed = self.followed.get(&key)?;
            if !followed.chained() {
                return None;
            }
            let part = followed
                .recent
                .as_ref()?
                .after(epoch, after, followed.last.seq, |seq| {
                    self.store.is_known(epoch, seq)
                })?;
            head = head.min(part.through);
            events.extend(part.events);
            if events.len() > limit {
                return None;
            }
        }
        events.sort_by_key(|event| event.id.seq);
        Some(Kept { events, head })
    }

    /// Drops the records kept for returning streams whose time is up.
    fn drop_expired_records(&mut self) {
        let now = Instant::now();
        while let Some(&(until, key)) = self.kept.front() {
            if until > now {
                return;
            }
            self.kept.pop_front();
            if let Some(followed) = self.followed.get_mut(&key) {
                if followed
                    .recent
                    .as_ref()
                    .is_some_and(|recent| recent.expired(now))
                {
                    followed.recent = None;
                }
            }
        }
    }

    /// Takes the copies waiting in the shared channel (at most
    /// [`COPIES_PER_ROUND`]; the next round takes the rest), in order.
    fn take_copies(&mut self) {
        let waker = Waker::from(Arc::clone(&self.rouse));
        let mut cx = Context::from_waker(&waker);
        let now = SystemTime::now();
        let mut newest = 0;
        let mut more = true;
        for _ in 0..COPIES_PER_ROUND {
            match self.copies.poll_recv(&mut cx) {
                Poll::Ready(Some(message)) => newest = newest.max(self.route(message, now)),
                Poll::Ready(None) | Poll::Pending => {
                    more = false;
                    break;
                }
            }
        }
        if newest > 0 {
            // A position up to here is a real one (see `recent`).
            self.store.note_head(self.store.epoch(), newest);
        }
        if more {
            self.rouse.notify.notify_one();
        }
    }

    /// Hands a live copy, taken at `now`, to the follow of its subject;
    /// returns its sequence (0 when it had none or no follow).
    fn route(&mut self, message: async_nats::Message, now: SystemTime) -> u64 {
        self.metrics.bus_messages_received.inc();
        let key = match self.routes.get(message.subject.as_str()) {
            Some(&key) => key,
            None => {
                // A new follow's first copy can be taken before its
                // `Follow`, which was sent before its subscription existed:
                // take the commands waiting, then look again.
                while let Ok(command) = self.commands.try_recv() {
                    self.handle(command);
                }
                match self.routes.get(message.subject.as_str()) {
                    Some(&key) => key,
                    // A copy for a follow that ended.
                    None => return 0,
                }
            }
        };
        match live_link(&message) {
            Some(link) => {
                if let Some(lag) = link.stored_at.and_then(|at| now.duration_since(at).ok()) {
                    self.metrics.bus_lag.observe(lag.as_secs_f64());
                }
                self.take(key, link, message, false);
                link.seq
            }
            None => {
                self.decoder.refused(
                    message.subject.as_str(),
                    0,
                    "live copy without Nats-Sequence",
                );
                0
            }
        }
    }

    /// Handles one live copy of target `key`. `end_confirmed`: the chain's
    /// end was just read back from the stream, so a copy that looks rewound
    /// is a late copy of an event stored on a server whose clock ran ahead.
    fn take(
        &mut self,
        key: u64,
        link: LiveLink,
        message: async_nats::Message,
        end_confirmed: bool,
    ) {
        let Some(followed) = self.followed.get_mut(&key) else {
            return;
        };
        if followed.repairing {
            followed.held.push((link, message));
            return;
        }
        let verdict = match judge(followed.last, link) {
            Verdict::Rewound if end_confirmed => Verdict::Duplicate,
            verdict => verdict,
        };
        match verdict {
            Verdict::Connects => {
                followed.connected_since_check = true;
                followed.last = Link {
                    seq: link.seq,
                    stored_at: link.stored_at,
                };
                let id = self.store.id(link.seq);
                let stored_at = link.stored_at.unwrap_or_else(SystemTime::now);
                if let Some(event) = self.decoder.decode_for(
                    followed.target.clone(),
                    message.subject.as_str(),
                    id,
                    message.headers.as_ref(),
                    &message.payload,
                    stored_at,
                ) {
                    followed.deliver(event, &*self.sink);
                }
            }
            Verdict::Duplicate => {}
            Verdict::Gap => {
                let after = followed.last;
                followed.held.push((link, message));
                self.start(
                    key,
                    Repair::Fill {
                        after,
                        through: link.seq,
                    },
                );
            }
            Verdict::Rewound => {
                let last = followed.last;
                followed.held.push((link, message));
                tracing::warn!(target = %followed.target, seq = link.seq, delivered = last.seq, "a live copy reuses a delivered sequence for another event; checking the stream");
                self.start(key, Repair::Confirm { last });
            }
        }
    }

    /// Starts a repair of `key`'s chain; its copies wait until it is done.
    fn start(&mut self, key: u64, repair: Repair) {
        let Some(followed) = self.followed.get_mut(&key) else {
            return;
        };
        followed.repairing = true;
        let store = Arc::clone(&self.store);
        let reads = Arc::clone(&self.reads);
        let subject = self.decoder.stored_subject(&followed.target);
        let generation = self.generation;
        let epoch = self.store.epoch();
        let repair = async move {
            let outcome = match repair {
                Repair::Retry { after } => {
                    tokio::time::sleep(after).await;
                    Outcome::Retry { key }
                }
                repair => {
                    let Ok(_permit) = reads.acquire().await else {
                        return Tagged {
                            generation,
                            epoch,
                            outcome: Outcome::Retry { key },
                        };
                    };
                    read(&store, key, &subject, repair).await
                }
            };
            Tagged {
                generation,
                epoch,
                outcome,
            }
        };
        self.repairs.push(repair.boxed());
    }

    /// Applies a finished repair or check.
    fn finish(&mut self, tagged: Tagged) {
        let epoch = tagged.epoch;
        if let Outcome::EpochMoved(result) = tagged.outcome {
            if let Err(error) = result {
                tracing::warn!(%error, "cannot move the epoch yet; retrying");
                self.move_epoch(MAX_RETRY, epoch);
            }
            return;
        }
        if tagged.generation != self.generation {
            // Started before the chains were re-anchored; a check is simply
            // over.
            if matches!(tagged.outcome, Outcome::Checked { .. }) {
                self.check_over();
            }
            return;
        }
        match tagged.outcome {
            Outcome::Filled {
                key,
                through,
                messages,
            } => self.filled(key, through, messages),
            Outcome::Confirmed { key, standing } => match standing {
                Standing::Stands | Standing::Removed => self.release(key, true),
                Standing::Rewound => self.rewound(key, epoch),
            },
            Outcome::Anchored { key, anchor } => {
                let epoch = self.store.epoch();
                if let Some(followed) = self.followed.get_mut(&key) {
                    followed.anchor_at(anchor, epoch);
                }
                self.release(key, false);
            }
            Outcome::Retry { key } => self.release(key, false),
            Outcome::Failed { key, error } => {
                tracing::warn!(%error, "cannot read the stream to repair a live chain; retrying");
                if let Some(followed) = self.followed.get_mut(&key) {
                    followed.repairing = false;
                }
                self.start(key, Repair::Retry { after: MAX_RETRY });
            }
            Outcome::Rewound { key } => self.rewound(key, epoch),
            Outcome::Checked {
                snapshot,
                subjects,
                newest,
                since_round,
            } => {
                self.metrics.live_checks.inc();
                match newest {
                    Ok(newest) => {
                        let answered = newest.by_subject.len();
                        self.metrics.live_check_reads.inc_by(newest.reads);
                        self.metrics.live_check_answers.inc_by(answered as u64);
                        if since_round {
                            self.sweep.since_answered(snapshot.len(), answered);
                        }
                        self.checked(snapshot, subjects, newest);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "cannot check the followed targets against the stream");
                    }
                }
                self.check_over();
            }
            Outcome::EpochMoved(_) => {}
        }
    }

    /// Delivers a fill's events, then the copies held meanwhile.
    fn filled(&mut self, key: u64, through: u64, messages: Vec<Stored>) {
        let Some(followed) = self.followed.get_mut(&key) else {
            return;
        };
        let from = followed.last.seq;
        let mut delivered = 0;
        for message in messages {
            if message.seq <= followed.last.seq {
                continue;
            }
            followed.last = message.link();
            delivered += 1;
            let id = self.store.id(message.seq);
            if let Some(event) = self.decoder.decode(
                &message.subject,
                id,
                Some(&message.headers),
                &message.payload,
                message.stored_at,
            ) {
                followed.deliver(event, &*self.sink);
            }
        }
        if delivered > 0 {
            self.metrics.gap_repairs.inc();
            self.tracing.gap_repaired(
                &self.decoder.stored_subject(&followed.target),
                from,
                delivered,
            );
            tracing::info!(target = %followed.target, from, events = delivered, "filled a live gap from the stream");
        }
        // A held copy at or below `through` that still does not connect is of
        // an event the stream does not hold under this subject: never
        // delivered as it is.
        let stored = &followed.target;
        let last = followed.last;
        followed.held.retain(|(link, _)| {
            let orphan = link.seq <= through && judge(last, *link) == Verdict::Gap;
            if orphan {
                tracing::warn!(target = %stored, seq = link.seq, "a live copy of an event the stream does not hold; dropped");
            }
            !orphan
        });
        self.release(key, false);
    }

    /// Ends a repair: the held copies are taken again, in order.
    fn release(&mut self, key: u64, end_confirmed: bool) {
        let Some(followed) = self.followed.get_mut(&key) else {
            return;
        };
        if self.rewinding {
            return;
        }
        if !followed.anchored {
            followed.repairing = false;
            self.start(key, Repair::Anchor);
            return;
        }
        followed.repairing = false;
        let held = followed.held.take();
        for (link, message) in held {
            self.take(key, link, message, end_confirmed);
        }
    }

    /// The history went back under `key`'s chain (found by a read started
    /// in `epoch`): move the epoch (ending every stream when it changes) and
    /// start every chain again.
    fn rewound(&mut self, key: u64, epoch: Epoch) {
        if let Some(followed) = self.followed.get(&key) {
            tracing::warn!(target = %followed.target, delivered = followed.last.seq, "the stream no longer holds an event this node delivered: its history went back");
        }
        if self.rewinding {
            return;
        }
        self.rewinding = true;
        self.generation += 1;
        for followed in self.followed.values_mut() {
            followed.repairing = true;
        }
        self.move_epoch(Duration::ZERO, epoch);
    }

    /// Moves the epoch away from `known`, after `after`, unless another node
    /// (or a recreated stream) already did.
    fn move_epoch(&mut self, after: Duration, known: Epoch) {
        let store = Arc::clone(&self.store);
        let generation = self.generation;
        self.repairs.push(
            async move {
                tokio::time::sleep(after).await;
                Tagged {
                    generation,
                    epoch: known,
                    outcome: Outcome::EpochMoved(store.move_epoch(known).await),
                }
            }
            .boxed(),
        );
    }

    /// The epoch changed (this node moved it, another node did, or the
    /// stream was recreated): positions in the old history mean nothing in
    /// the new one. Every stream ends (its client resumes and is told with
    /// one `herald.reset`) and every chain is anchored again at its
    /// subject's newest event.
    fn restart_chains(&mut self) {
        self.generation += 1;
        self.rewinding = false;
        self.checking = false;
        self.metrics.history_changes.inc();
        self.sink.history_changed();
        let keys: Vec<u64> = self.followed.keys().copied().collect();
        for key in keys {
            if let Some(followed) = self.followed.get_mut(&key) {
                followed.anchored = false;
                if let Some(recent) = &mut followed.recent {
                    recent.invalidate();
                }
                if followed.subscription.is_none() {
                    // Anchored once it is set up.
                    continue;
                }
            }
            self.start(key, Repair::Anchor);
        }
    }

    /// Takes every leader advisory waiting: a new leader may never send the
    /// copies of what the old one stored last, so every target is checked.
    fn follow_leader_changes(&mut self) {
        let waker = Waker::from(Arc::clone(&self.rouse));
        let mut cx = Context::from_waker(&waker);
        let mut elected = false;
        while let Poll::Ready(Some(advisory)) = self.leader_changes.poll_next_unpin(&mut cx) {
            let leader = serde_json::from_slice::<serde_json::Value>(&advisory.payload)
                .ok()
                .and_then(|a| a["leader"].as_str().map(str::to_owned))
                .unwrap_or_default();
            tracing::info!(%leader, "the stream has a new leader; checking every followed target");
            self.metrics.stream_leader_changes.inc();
            elected = true;
        }
        if elected {
            self.check_now();
        }
    }

    /// Checks every target now (copies may have been lost): at once, or
    /// after the check in flight, which may have read before the loss.
    fn check_now(&mut self) {
        self.after_loss = true;
        if self.checking {
            self.check_again = true;
        } else {
            self.start_check(Check::Everything);
        }
    }

    /// A check ended: the one asked for meanwhile, if any, starts (every
    /// target before a slice).
    fn check_over(&mut self) {
        self.checking = false;
        if std::mem::take(&mut self.check_again) {
            self.start_check(Check::Everything);
        } else if std::mem::take(&mut self.slice_due) {
            self.start_check(Check::Slice);
        }
    }

    /// Reads the newest stored message of the subjects `check` covers. One
    /// check is in flight at a time: a slice that comes due meanwhile starts
    /// when it ends (a check of everything asked for meanwhile is
    /// [`Dispatcher::check_now`]'s).
    fn start_check(&mut self, check: Check) {
        if self.rewinding || self.followed.is_empty() {
            return;
        }
        if self.checking {
            self.slice_due |= check == Check::Slice;
            return;
        }
        // What arrived before the read is judged first, so the check finds
        // only what never arrived.
        self.take_copies();
        let mut since_checked = false;
        let keys: Vec<u64> = match check {
            Check::Slice => {
                let keys = self.sweep.next_slice(self.followed.keys().copied());
                since_checked = !self.sweep.full_round();
                keys
            }
            Check::Everything => {
                if self.after_loss {
                    // A target under repair is not read: its own copies lost
                    // meanwhile are found by the next check, run once this
                    // one is done.
                    self.check_again |= self.followed.values().any(|f| f.repairing);
                    self.after_loss = self.check_again;
                }
                self.followed.keys().copied().collect()
            }
        };
        // A chain a live copy connected to since the check last came by was
        // complete up to that copy: a copy lost before it made it a gap
        // (filled from the stream), and one lost after it is found by the
        // next copy or by the check's next visit. A since round leaves such
        // chains out; full rounds and checks of everything read every chain.
        let visited = keys.len();
        let mut snapshot: Vec<(u64, Link)> = Vec::with_capacity(visited);
        let mut subjects: Vec<String> = Vec::with_capacity(visited);
        let mut left_out = 0;
        for key in keys {
            let Some(followed) = self.followed.get_mut(&key) else {
                continue;
            };
            let connected = std::mem::take(&mut followed.connected_since_check);
            if followed.repairing {
                continue;
            }
            if connected && since_checked {
                left_out += 1;
                continue;
            }
            snapshot.push((key, followed.last));
            subjects.push(self.decoder.stored_subject(&followed.target));
        }
        if since_checked {
            // The chains left out count as asked and not answered: the
            // round's slices are sized by what their reads carry.
            self.sweep.since_answered(visited - snapshot.len(), 0);
            self.metrics.live_check_left_out.inc_by(left_out);
            if snapshot.is_empty() {
                return;
            }
        }
        self.checking = true;
        // Every chain read is complete through its `progressed` (everything
        // stored for its subject up to there was delivered or precedes its
        // anchor), so a subject with nothing stored after the lowest of them
        // has nothing this node lacks: it may be left out of the answer.
        let since = if since_checked {
            snapshot
                .iter()
                .filter_map(|(key, _)| self.followed.get(key))
                .map(|followed| followed.progressed)
                .min()
                .unwrap_or(0)
        } else {
            0
        };
        let store = Arc::clone(&self.store);
        let generation = self.generation;
        let epoch = store.epoch();
        self.repairs.push(
            async move {
                let newest = store.newest_after(&subjects, since).await;
                Tagged {
                    generation,
                    epoch,
                    outcome: Outcome::Checked {
                        snapshot,
                        subjects,
                        newest,
                        since_round: since_checked,
                    },
                }
            }
            .boxed(),
        );
    }

    /// Compares each checked chain with its subject's newest stored event.
    fn checked(&mut self, snapshot: Vec<(u64, Link)>, subjects: Vec<String>, newest: Newest) {
        // Copies that arrived while the check read are judged first.
        self.take_copies();
        let mut behind: Option<(u64, Link)> = None;
        for ((key, then), stored_subject) in snapshot.into_iter().zip(subjects) {
            let Some(followed) = self.followed.get_mut(&key) else {
                continue;
            };
            if followed.repairing || followed.last != then {
                // Its chain moved meanwhile: it is alive and judged by its copies.
                continue;
            }
            let last = followed.last;
            if newest.unanswered.contains(&stored_subject) {
                continue;
            }
            if newest.through.is_none_or(|through| through < last.seq) {
                // The answer ends before this chain does: the answering
                // server is behind, or the stream's end went back below what
                // this node delivered. One leader read for the furthest such
                // chain tells which.
                if behind.is_none_or(|(_, furthest): (u64, Link)| furthest.seq < last.seq) {
                    behind = Some((key, last));
                }
                continue;
            }
            let stored = newest.by_subject.get(&stored_subject).copied();
            let complete = match stored {
                Some(stored) if stored.seq > last.seq => {
                    tracing::info!(target = %followed.target, delivered = last.seq, stored = stored.seq, "a stored event never arrived live; filling");
                    self.start(
                        key,
                        Repair::Fill {
                            after: last,
                            through: stored.seq,
                        },
                    );
                    continue;
                }
                Some(stored) if stored.seq == last.seq => {
                    judge(
                        last,
                        LiveLink {
                            seq: stored.seq,
                            previous: 0,
                            stored_at: stored.stored_at,
                        },
                    ) == Verdict::Duplicate
                }
                None if last.seq == 0 => true,
                // Left out of the answer: nothing stored after a position
                // this chain was complete through (see `start_check`).
                None if newest.left_out_through > 0 => true,
                // Older than the chain's end, or nothing, from a server that
                // has caught up with it: the end was removed, or the history
                // went back; the leader tells which.
                _ => false,
            };
            if !complete {
                self.start(key, Repair::Confirm { last });
                continue;
            }
            if let Some(through) = newest.through {
                if through > followed.progressed && through >= last.seq {
                    followed.progressed = through;
                    self.sink.progress(&followed.target, self.store.id(through));
                }
            }
        }
        if let Some((key, last)) = behind {
            if self
                .followed
                .get(&key)
                .is_some_and(|f| !f.repairing && f.last == last)
            {
                self.start(key, Repair::Confirm { last });
            }
        }
    }
}

/// Does the stream reads of one repair.
async fn read(store: &Arc<Store>, key: u64, subject: &str, repair: Repair) -> Outcome {
    let result = match repair {
        Repair::Fill { after, through } => {
            fill(store, subject, after, through)
                .await
                .map(|read| match read {
                    Some(messages) => Outcome::Filled {
                        key,
                        through,
                        messages,
                    },
                    None => Outcome::Rewound { key },
                })
        }
        Repair::Confirm { last } => store
            .standing(subject, last)
            .await
            .map(|standing| Outcome::Confirmed { key, standing }),
        Repair::Anchor => store
            .anchor_of(subject)
            .await
            .map(|anchor| Outcome::Anchored { key, anchor }),
        Repair::Retry { .. } => Ok(Outcome::Retry { key }),
    };
    result.unwrap_or_else(|error| Outcome::Failed { key, error })
}

/// The events of `subject` after `after` up to `through`, or `None` when
/// `after` no longer stands (the history went back).
async fn fill(
    store: &Store,
    subject: &str,
    after: Link,
    through: u64,
) -> Result<Option<Vec<Stored>>, ReadError> {
    if store.standing(subject, after).await? == Standing::Rewound {
        return Ok(None);
    }
    store
        .between(subject, after.seq, through, usize::MAX - 1)
        .await
        .map(Some)
}

/// A live copy's chain headers; `None` without `Nats-Sequence` (not a copy
/// the stream republished).
fn live_link(message: &async_nats::Message) -> Option<LiveLink> {
    let headers = message.headers.as_ref()?;
    let number = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.as_str().parse::<u64>().ok())
    };
    Some(LiveLink {
        seq: number("Nats-Sequence")?,
        previous: number("Nats-Last-Sequence").unwrap_or(0),
        stored_at: headers
            .get("Nats-Time-Stamp")
            .and_then(|v| parse_time(v.as_str())),
    })
}
