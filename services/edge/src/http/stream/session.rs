//! An open stream, from its first write to its end: the replay (or reset)
//! it begins with, batches of live frames, heartbeats, the token's expiry
//! warning, and leaving with a `retry:` hint. [`Session`] holds the stream's
//! state; [`body`] is the stream's body, the order of its writes in one place.
//! [`Attachment`] keeps the connection registered while the body lives.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use herald_protocol::{EventId, StreamPosition, Target, sse};
use serde_json::json;
use tokio::time::Sleep;
use tokio_util::sync::WaitForCancellationFutureOwned;

use super::cursor::{Cursor, Written};
use crate::bus::{Event, LostReason, Replay, ReplayError};
use crate::http::AppState;
use crate::http::rare_wake::RareWake;
use crate::metrics::ReasonLabel;
use crate::registry::{DisconnectReason, Frame, Kill, Notice, QueueReader, Queued};

/// Where a stream starts.
#[derive(Debug, Clone)]
pub(super) enum Start {
    /// Replay each target's events after its position (the client's, or the
    /// head for a fresh stream); `fresh` streams are told their position with
    /// an id-only frame.
    After { from: StreamPosition, fresh: bool },
    /// The client's id cannot be used: reset.
    Lost(LostReason),
}

/// Keeps a connection registered; dropping it (the client left, the stream
/// ended) detaches it from the registry and logs the close.
pub(super) struct Attachment {
    state: Arc<AppState>,
    id: u64,
    targets: Vec<Target>,
    expires_at: SystemTime,
    kill: Kill,
    reason: DisconnectReason,
    opened: Instant,
}

impl Attachment {
    /// Registers nothing itself: the connection `id` was attached to
    /// `targets` already; this keeps it there until dropped.
    pub(super) fn new(
        state: Arc<AppState>,
        id: u64,
        targets: Vec<Target>,
        expires_at: SystemTime,
        kill: Kill,
    ) -> Self {
        Attachment {
            state,
            id,
            targets,
            expires_at,
            kill,
            reason: DisconnectReason::ClientClosed,
            opened: Instant::now(),
        }
    }

    /// Counts and logs the stream as open (its close is logged on drop), and
    /// tells the registry its targets are delivered live.
    pub(super) fn opened(&self, resumed: bool) {
        let state = &self.state;
        state.registry.followed(&self.targets);
        state.metrics.connects.inc();
        let user = &self.targets[0];
        let topics = self.targets.len() - 1;
        tracing::info!(
            connection = self.id,
            user = %state.tracing.user_for_logs(user),
            topics,
            resume = resumed,
            "stream opened"
        );
        state.tracing.stream_opened(self.id, user, topics, resumed);
    }

    /// Records why the stream is ending (unless it was killed for a reason).
    fn end_because(&mut self, reason: DisconnectReason) {
        self.reason = reason;
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.state
            .registry
            .detach(self.id, &self.targets, &*self.state.bus);
        let reason = self.kill.reason().unwrap_or(self.reason);
        self.state
            .metrics
            .disconnects
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
        let tracing = &self.state.tracing;
        let open_for = self.opened.elapsed();
        tracing::info!(
            connection = self.id,
            user = %tracing.user_for_logs(&self.targets[0]),
            reason = reason.as_str(),
            duration_ms = open_for.as_millis() as u64,
            "stream closed"
        );
        tracing.stream_closed(self.id, &self.targets[0], reason.as_str(), open_for);
    }
}

/// The body of one stream; see the module docs for the sequence. Every write
/// is one yielded chunk; the attachment (and with it the connection's place in
/// the registry) goes when the body ends or is dropped.
pub(super) fn body(
    attachment: Attachment,
    frames: QueueReader,
    start: Start,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + Sync + 'static {
    let stream = async_stream::stream! {
        // Boxed: the replay's future is large and lives only until the first
        // write; inline, its size would stay in every open stream's body.
        let (mut session, replay) = match Box::pin(Session::begin(attachment, frames, start)).await {
            Ok(begun) => begun,
            Err(NotBegun { written, attachment }) => {
                yield Ok(written);
                drop(attachment);
                return;
            }
        };
        for event in &replay.events {
            if let Some(batch) = session.write_replayed(event) {
                yield Ok(batch);
            }
        }
        let replayed = replay.events.len();
        drop(replay.events);
        yield Ok(session.end_replay(replayed, replay.head));

        let deadlines = session.deadlines();
        let timer = tokio::time::sleep_until(deadlines.next());
        let drained = drained(Arc::clone(&session.state));
        let killed = session.attachment.kill.killed_owned();
        tokio::pin!(timer, drained, killed);
        let mut waits = Waits {
            killed,
            drained,
            timer,
            deadlines,
            rare: RareWake::new(),
        };
        loop {
            let next = match session.next_step(&mut waits).await {
                Step::Frame(first) => session.write_batch(first),
                Step::Heartbeat => Next::Write(session.heartbeat()),
                Step::ExpiryWarning => Next::Write(session.expiry_warning()),
                Step::Expired => {
                    session.attachment.end_because(DisconnectReason::TokenExpired);
                    Next::End
                }
                Step::Leave(reason) => Next::Last(session.leave(reason)),
                Step::End => Next::End,
            };
            match next {
                Next::Write(bytes) => {
                    yield Ok(bytes);
                    waits.wrote(session.heartbeat_every);
                }
                // Nothing written: the heartbeat keeps its time.
                Next::Idle => {}
                Next::Last(bytes) => {
                    yield Ok(bytes);
                    break;
                }
                Next::End => break,
            }
        }
    };
    sync_wrapper::SyncStream::new(stream)
}

/// One open stream: its attachment, its queue, and what it has written.
struct Session {
    state: Arc<AppState>,
    attachment: Attachment,
    frames: QueueReader,
    /// Bytes waiting to be yielded as one write.
    buf: BytesMut,
    cursor: Cursor,
    /// `stream.max_batch_bytes`: a batch ends once it holds this much.
    batch_limit: usize,
    heartbeat_every: Duration,
}

/// The replay a session begins with (read before its first write).
struct Replayed {
    /// Events to write, oldest first.
    events: Vec<Arc<Event>>,
    /// The position the replay read every target up to.
    head: u64,
}

/// A stream that could not begin: the comment and `retry:` hint it writes
/// before it ends, and its attachment, kept until they are written.
struct NotBegun {
    written: Bytes,
    attachment: Attachment,
}

/// What an open stream waits for besides its queue, pinned in its body.
/// These are rare next to queued frames: they are polled with a
/// [`RareWake`], and only again after it fired, so a stream woken by its
/// queue polls its queue alone (each of these takes a lock to poll).
struct Waits<'a, D> {
    killed: Pin<&'a mut WaitForCancellationFutureOwned>,
    /// The node going away ([`drained`]).
    drained: Pin<&'a mut D>,
    /// One timer for the heartbeat, the expiry warning and the expiry, set
    /// to the earliest of them (a timer is 112 bytes of every open stream).
    timer: Pin<&'a mut Sleep>,
    deadlines: Deadlines,
    rare: RareWake,
}

/// When an open stream has something to write or to end besides its queue.
struct Deadlines {
    heartbeat: tokio::time::Instant,
    /// The token's expiry warning, until it is due.
    warning: Option<tokio::time::Instant>,
    expiry: tokio::time::Instant,
}

impl Deadlines {
    /// The earliest of them.
    fn next(&self) -> tokio::time::Instant {
        let soonest = self.heartbeat.min(self.expiry);
        self.warning.map_or(soonest, |warning| warning.min(soonest))
    }

    /// What is due at `now`, in order: the expiry, its warning (taken: it
    /// is due once), the heartbeat.
    fn due(&mut self, now: tokio::time::Instant) -> Option<Step> {
        if now >= self.expiry {
            Some(Step::Expired)
        } else if self.warning.is_some_and(|warning| now >= warning) {
            self.warning = None;
            Some(Step::ExpiryWarning)
        } else if now >= self.heartbeat {
            Some(Step::Heartbeat)
        } else {
            None
        }
    }
}

impl<D: Future<Output = ()>> Waits<'_, D> {
    /// The stream wrote: the heartbeat starts again.
    fn wrote(&mut self, heartbeat_every: Duration) {
        self.deadlines.heartbeat = tokio::time::Instant::now() + heartbeat_every;
        let next = self.deadlines.next();
        self.timer.as_mut().reset(next);
    }

    /// What woke the stream, in order: its kill, the node going away, the
    /// token's expiry, its warning, a queued entry, the heartbeat.
    fn poll_next(&mut self, cx: &mut Context<'_>, frames: &mut QueueReader) -> Poll<Woke> {
        let mut heartbeat = false;
        if self.rare.woken(cx) {
            let mut rare = self.rare.context();
            let mut fired = false;
            let step = if self.killed.as_mut().poll(&mut rare).is_ready() {
                Some(Step::End)
            } else if self.drained.as_mut().poll(&mut rare).is_ready() {
                Some(Step::Leave(DisconnectReason::Shutdown))
            } else if self.timer.as_mut().poll(&mut rare).is_ready() {
                fired = true;
                match self.deadlines.due(tokio::time::Instant::now()) {
                    Some(Step::Heartbeat) => {
                        // Set again by the write that follows.
                        heartbeat = true;
                        None
                    }
                    due => {
                        // Set again for what is still to come.
                        let next = self.deadlines.next();
                        self.timer.as_mut().reset(next);
                        if due.is_none() {
                            // Nothing is written: registered here, as no
                            // step follows to poll it again.
                            let _ = self.timer.as_mut().poll(&mut rare);
                        }
                        due
                    }
                }
            } else {
                None
            };
            // A timer that fired, or was set again, wakes no one until it is
            // polled again.
            if step.is_some() || fired {
                // Ready stays ready: look again next time, after what this
                // step writes (and the heartbeat's reset that follows).
                self.rare.rearm();
            }
            if let Some(step) = step {
                return Poll::Ready(Woke::Rare(step));
            }
        }
        match frames.poll_recv(cx) {
            Poll::Ready(queued) => Poll::Ready(Woke::Queued(queued)),
            Poll::Pending if heartbeat => Poll::Ready(Woke::Rare(Step::Heartbeat)),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// What [`Waits::poll_next`] found.
enum Woke {
    Rare(Step),
    Queued(Option<Queued>),
}

/// What woke an open stream.
enum Step {
    Frame(Frame),
    Heartbeat,
    ExpiryWarning,
    Expired,
    /// End with a `retry:` hint so the client reconnects (to another node).
    Leave(DisconnectReason),
    End,
}

/// What an open stream does after a step.
enum Next {
    /// Write, then go on (the heartbeat starts again).
    Write(Bytes),
    /// Go on without writing.
    Idle,
    /// Write, then end.
    Last(Bytes),
    /// End without writing.
    End,
}

impl Session {
    /// Writes the stream's opening (a comment and a `retry:` hint) and reads
    /// where it starts: the replay after the client's position, or the reset.
    async fn begin(
        mut attachment: Attachment,
        frames: QueueReader,
        start: Start,
    ) -> Result<(Session, Replayed), NotBegun> {
        let state = Arc::clone(&attachment.state);
        let mut buf = BytesMut::with_capacity(512);
        sse::write_comment(&mut buf, "herald stream");
        sse::write_retry(&mut buf, state.retry_hint_ms());
        let in_order = state.bus.delivers_in_order();
        let begun = read_start(
            &state,
            attachment.id,
            &attachment.targets,
            start,
            in_order,
            &mut buf,
        )
        .await;
        let (events, cursor, head) = match begun {
            Ok(begun) => begun,
            Err(problem) => {
                tracing::warn!(connection = attachment.id, %problem, "replay failed; client will retry");
                attachment.end_because(DisconnectReason::BusUnavailable);
                return Err(NotBegun {
                    written: buf.split().freeze(),
                    attachment,
                });
            }
        };
        let session = Session {
            batch_limit: state.settings.stream.max_batch_bytes,
            heartbeat_every: Duration::from_millis(state.settings.stream.heartbeat_ms),
            state,
            attachment,
            frames,
            buf,
            cursor,
        };
        Ok((session, Replayed { events, head }))
    }

    /// Writes one replayed event; returns a batch once it is full.
    fn write_replayed(&mut self, event: &Arc<Event>) -> Option<Bytes> {
        let slot = self
            .attachment
            .targets
            .iter()
            .position(|t| *t == event.target)
            .unwrap_or(usize::MAX);
        self.cursor.write(slot as u32, event, &mut self.buf);
        self.state.delivered(
            event,
            self.attachment.id,
            &self.attachment.targets[0],
            true,
            Duration::ZERO,
        );
        (self.buf.len() >= self.batch_limit)
            .then(|| self.state.written(self.buf.split().freeze(), 0))
    }

    /// Counts the `replayed` events and returns what is left to write of
    /// the replay; live events follow from `head` on.
    fn end_replay(&mut self, replayed: usize, head: u64) -> Bytes {
        self.state.metrics.events_delivered.inc_by(replayed as u64);
        // The replay read every target up to the head.
        self.cursor.advance_all(head);
        let written = self.idle_write();
        self.state.written(written, 0)
    }

    /// The first heartbeat, the token's expiry warning and its end: tokens
    /// are accepted until `exp` plus the leeway (whole seconds), so the
    /// stream lives exactly as long as its token would still open one.
    fn deadlines(&self) -> Deadlines {
        let auth = &self.state.settings.auth;
        let expires_at = self.attachment.expires_at;
        let accepted_until = expires_at + Duration::from_secs(auth.leeway_secs + 1);
        let warning = Duration::from_secs(auth.expiry_warning_secs);
        Deadlines {
            heartbeat: tokio::time::Instant::now() + self.heartbeat_every,
            warning: Some(deadline(expires_at, warning)),
            expiry: deadline(accepted_until, Duration::ZERO),
        }
    }

    /// Waits for what the stream does next. Progress moves the cursor on
    /// the way (the client hears of it at the next heartbeat).
    async fn next_step<D: Future<Output = ()>>(&mut self, waits: &mut Waits<'_, D>) -> Step {
        loop {
            let frames = &mut self.frames;
            let queued = match std::future::poll_fn(|cx| waits.poll_next(cx, frames)).await {
                Woke::Rare(step) => return step,
                Woke::Queued(queued) => queued,
            };
            match queued {
                Some(Queued::Event(frame)) => return Step::Frame(frame),
                Some(Queued::Notice(notice)) => match *notice {
                    Notice::Progress { slot, through } => self.cursor.advance(slot, through),
                    Notice::Leave(reason) => return Step::Leave(reason),
                    // Its `Leave` follows: written with it.
                    Notice::Reason(frame) => self.buf.extend_from_slice(&frame),
                },
                None => return Step::End,
            }
        }
    }

    /// Writes `first` and the frames queued behind it, up to
    /// `stream.max_batch_bytes`, as one write; ends the stream when the
    /// history changed or the node asked it to leave.
    fn write_batch(&mut self, first: Frame) -> Next {
        let mut delivered = 0;
        let mut leaving = None;
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            match self.cursor.write(frame.slot, &frame.event, &mut self.buf) {
                Written::Yes => {
                    delivered += 1;
                    let queued = frame.queued_at.elapsed();
                    let (id, user) = (self.attachment.id, &self.attachment.targets[0]);
                    self.state.delivered(&frame.event, id, user, false, queued);
                }
                Written::Skipped => {}
                Written::OtherEpoch => {
                    // The history changed under the stream: its client
                    // resumes and is told.
                    leaving = Some(DisconnectReason::HistoryChanged);
                    break;
                }
            }
            match self.queued_behind() {
                Ok(frame) => next = frame,
                Err(reason) => leaving = Some(reason),
            }
        }
        if let Some(reason) = leaving {
            self.attachment.end_because(reason);
            sse::write_retry(&mut self.buf, self.state.retry_hint_ms());
            return Next::Last(self.state.written(self.buf.split().freeze(), delivered));
        }
        if self.buf.is_empty() {
            return Next::Idle;
        }
        Next::Write(self.state.written(self.buf.split().freeze(), delivered))
    }

    /// The next frame already queued, while the batch has room (progress on
    /// the way moves the cursor); `Err` when the node asks the stream to leave.
    fn queued_behind(&mut self) -> Result<Option<Frame>, DisconnectReason> {
        while self.buf.len() < self.batch_limit {
            match self.frames.try_recv() {
                Some(Queued::Event(frame)) => return Ok(Some(frame)),
                Some(Queued::Notice(notice)) => match *notice {
                    Notice::Progress { slot, through } => self.cursor.advance(slot, through),
                    Notice::Leave(reason) => return Err(reason),
                    Notice::Reason(frame) => self.buf.extend_from_slice(&frame),
                },
                None => break,
            }
        }
        Ok(None)
    }

    /// Keeps an idle connection warm. Positions moved by progress alone
    /// reach the client here: an id-only frame sets its last event id and
    /// keeps the connection warm like a comment.
    fn heartbeat(&mut self) -> Bytes {
        if !self.cursor.write_id_if_moved(&mut self.buf) {
            sse::write_comment(&mut self.buf, "");
        }
        self.idle_write()
    }

    /// What is written, taking the buffer's allocation with it, when the
    /// stream goes idle (after its opening, at a heartbeat): an idle stream
    /// then holds no buffer until its next event, instead of the rest of
    /// its last allocation (512 bytes after the opening) for as long as it
    /// stays open.
    fn idle_write(&mut self) -> Bytes {
        std::mem::take(&mut self.buf).freeze()
    }

    /// Writes the token's expiry warning (once).
    fn expiry_warning(&mut self) -> Bytes {
        write_expiry_warning(&mut self.buf, self.attachment.expires_at);
        self.buf.split().freeze()
    }

    /// Ends the stream for `reason` with a `retry:` hint, so the client
    /// reconnects (to another node).
    fn leave(&mut self, reason: DisconnectReason) -> Bytes {
        self.attachment.end_because(reason);
        sse::write_retry(&mut self.buf, self.state.retry_hint_ms());
        self.buf.split().freeze()
    }
}

/// Why a stream could not begin (it ends with the comment and `retry:` hint
/// already written; its client comes back).
#[derive(Debug, thiserror::Error)]
enum BeginError {
    /// The bus could not be read.
    #[error(transparent)]
    Replay(#[from] ReplayError),
    /// The replay was read in another epoch than the stream's position.
    #[error("the stream's epoch changed during the replay")]
    EpochChanged,
}

/// Reads the replay for `start` and writes what comes before it (an id-only
/// frame for a fresh stream, or the reset) into `buf`. Returns the events to
/// send, the cursor before them, and the head the replay read up to.
async fn read_start(
    state: &AppState,
    connection: u64,
    targets: &[Target],
    start: Start,
    in_order: bool,
    buf: &mut BytesMut,
) -> Result<(Vec<Arc<Event>>, Cursor, u64), BeginError> {
    let limit = state.settings.stream.max_replay_events;
    let (from, fresh) = match start {
        Start::After { from, fresh } => (from, fresh),
        Start::Lost(reason) => {
            let head = state.bus.head().await?;
            write_reset(state, buf, reason, head);
            let cursor = Cursor::new(StreamPosition::at(head, targets.len()), targets, in_order);
            return Ok((Vec::new(), cursor, head.seq));
        }
    };
    let started = Instant::now();
    match state.bus.replay(targets, &from, limit).await? {
        Replay::Complete { events, head } => {
            let mut cursor = Cursor::new(from, targets, in_order);
            if fresh {
                // Tell the client where it starts, so a reconnect before any
                // event still resumes from here (an id-only frame dispatches
                // no event but sets the browser's last event id).
                cursor.write_id(buf);
            } else if !events.is_empty() {
                state.metrics.replays.inc();
                state.metrics.replayed_events.inc_by(events.len() as u64);
                state
                    .tracing
                    .replayed(connection, events.len(), "complete", started.elapsed());
            }
            if head.epoch != cursor.epoch() {
                // Read in another epoch than asked (the stream changed
                // meanwhile): nothing of it can be placed; start again.
                return Err(BeginError::EpochChanged);
            }
            Ok((events, cursor, head.seq))
        }
        Replay::HistoryLost { reason, head } => {
            state
                .tracing
                .replayed(connection, 0, reason.as_str(), started.elapsed());
            write_reset(state, buf, reason, head);
            let cursor = Cursor::new(StreamPosition::at(head, targets.len()), targets, in_order);
            Ok((Vec::new(), cursor, head.seq))
        }
    }
}

/// Resolves when this stream should end because the node is going away: at a
/// random moment within the drain window after draining starts, or at once
/// when the node stops serving.
async fn drained(state: Arc<AppState>) {
    tokio::select! {
        _ = state.shutdown.cancelled() => {}
        _ = async {
            state.drain.cancelled().await;
            let window = state.settings.stream.drain_ms;
            // Boxed: a timer inline here would be part of every open
            // stream's body, drained or not.
            Box::pin(tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=window)))).await;
        } => {}
    }
}

/// The tokio instant `before` ahead of the wall-clock time `at` (now, if past).
fn deadline(at: SystemTime, before: Duration) -> tokio::time::Instant {
    let left = at
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .saturating_sub(before);
    tokio::time::Instant::now() + left
}

/// Writes `herald.token-expiring`: the application should open a fresh stream
/// with a new token and its last event id, then close this one. It has no id,
/// so it does not move the client's resume position.
fn write_expiry_warning(buf: &mut BytesMut, expires_at: SystemTime) {
    let expires_at = expires_at
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let event_type = herald_protocol::EventType::system("herald.token-expiring");
    let data = json!({ "expires_at": expires_at }).to_string();
    sse::write_event(buf, None, Some(&event_type), &data);
}

/// Writes the one `herald.reset` event: the application must refetch its state;
/// the stream continues live from `head`.
fn write_reset(state: &AppState, buf: &mut BytesMut, reason: LostReason, head: EventId) {
    state
        .metrics
        .resets
        .get_or_create(&ReasonLabel {
            reason: reason.as_str(),
        })
        .inc();
    let data = json!({ "reason": reason.as_str() }).to_string();
    let event_type = herald_protocol::EventType::system("herald.reset");
    sse::write_event(buf, Some(&head), Some(&event_type), &data);
}
