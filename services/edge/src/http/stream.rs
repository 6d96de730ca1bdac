//! `GET /v1/stream`: one client's SSE stream.
//!
//! Opening a stream, in order:
//! 1. authenticate the token (header, `access_token` query or cookie) and work
//!    out the targets: the user, plus every `topic=` the token grants;
//! 2. fix the starting position: the client's `Last-Event-ID` (header or
//!    `last_event_id` query), or for a fresh stream the bus head *before*
//!    attaching, so nothing published after the request arrived is missed;
//! 3. attach to the registry (live events now queue up) and wait until the bus
//!    delivers every target live;
//! 4. answer 200 and write: a comment, a jittered `retry:` hint, then the replay
//!    of everything after the starting position (or one `herald.reset` if that
//!    history is gone), then live events, skipping any the replay already sent.
//!
//! The connection's cursor (the last sequence written) makes the hand-over from
//! replay to live exact: queued live events at or below it are dropped, so the
//! client sees every event once, in order. Frames waiting in the queue are
//! written together, one write per batch. Heartbeat comments keep proxies from
//! closing idle streams. The stream ends when the client leaves, when it is cut
//! as too slow, or when the node shuts down (with a `retry:` hint first).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use herald_protocol::{EventId, PositionError, StreamPosition, Target, fingerprint_of, sse};
use serde_json::json;
use tokio::sync::mpsc;
use tokio::time::Sleep;
use warp::http::{HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Rejection, Reply};

use super::AppState;
use super::credentials::{bearer_token, cookie_token};
use super::errors::ApiError;
use crate::bus::nats::FollowError;
use crate::bus::{Event, FollowState, LostReason, Replay, ReplayError};
use crate::metrics::ReasonLabel;
use crate::registry::{AttachError, ConnectionHandle, DisconnectReason, Frame, Kill, Queued};

/// How long to wait for the bus to start live delivery of a stream's targets.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(10);

/// What the client asked for, read from the request.
#[derive(Debug, Default)]
pub struct StreamRequest {
    /// The token: `Authorization: Bearer`, else `access_token`, else the cookie.
    pub token: Option<String>,
    /// Every `topic=` parameter, in order.
    pub topics: Vec<String>,
    /// `Last-Event-ID` header, else the `last_event_id` parameter.
    pub last_event_id: Option<String>,
}

impl StreamRequest {
    /// Reads the request's headers and raw query string (fuzzed: it takes
    /// arbitrary client input).
    pub fn parse(headers: &HeaderMap, query: &str) -> Result<Self, ApiError> {
        let mut request = StreamRequest::default();
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            match &*key {
                "access_token" => request.token = Some(value.into_owned()),
                "topic" => request.topics.push(value.into_owned()),
                "last_event_id" => request.last_event_id = Some(value.into_owned()),
                _ => {}
            }
        }
        if let Some(value) = headers.get("last-event-id") {
            let value = value.to_str().map_err(|_| {
                ApiError::bad_request("invalid_last_event_id", "Last-Event-ID is not ASCII text")
            })?;
            request.last_event_id = Some(value.to_owned());
        }
        if let Some(token) = bearer_token(headers)? {
            request.token = Some(token);
        } else if request.token.is_none() {
            request.token = cookie_token(headers);
        }
        Ok(request)
    }
}

/// Where a stream starts.
#[derive(Debug, Clone)]
enum Start {
    /// Replay each target's events after its position (the client's, or the
    /// head for a fresh stream); `fresh` streams are told their position with
    /// an id-only frame.
    After { from: StreamPosition, fresh: bool },
    /// The client's id cannot be used: reset.
    Lost(LostReason),
}

/// Handles `GET /v1/stream`.
pub async fn open(
    state: Arc<AppState>,
    headers: HeaderMap,
    query: String,
    kill: Option<Kill>,
) -> Result<Response, Rejection> {
    let request = StreamRequest::parse(&headers, &query)?;
    let token = request
        .token
        .as_deref()
        .ok_or_else(|| ApiError::from(crate::auth::AuthError::Missing))?;
    let subscriber = state.auth.subscriber(token).map_err(ApiError::from)?;
    let targets = targets(&state, &subscriber, &request.topics)?;

    if state.is_draining() {
        return Ok(come_back_later(&state, "draining"));
    }
    let Some(start) = start_of(&state, request.last_event_id.as_deref(), &targets).await else {
        return Ok(come_back_later(&state, "bus_unavailable"));
    };

    let kill = kill.unwrap_or_default();
    let id = state.registry.next_connection_id();
    let (handle, frames) = ConnectionHandle::new(
        id,
        state.settings.stream.queue_capacity,
        kill.clone(),
        Arc::clone(&state.metrics),
    );
    let follows = match state.registry.attach(&handle, &targets, &*state.bus) {
        Ok(follows) => follows,
        Err(err) => return refuse(&state, err),
    };
    let attachment = Attachment {
        state: Arc::clone(&state),
        id,
        targets,
        expires_at: subscriber.expires_at,
        kill,
        reason: DisconnectReason::ClientClosed,
        opened: Instant::now(),
    };
    if let Err(problem) = wait_until_followed(follows).await {
        tracing::warn!(connection = id, %problem, "bus could not follow the stream's targets");
        drop(attachment);
        return Ok(come_back_later(&state, "bus_unavailable"));
    }
    attachment.opened(request.last_event_id.is_some());
    let body = session(attachment, frames, start);
    Ok(sse_response(warp::reply::stream(body).into_response()))
}

/// Where a stream with the client's `last_event_id` starts; `None` when a
/// fresh stream cannot read the bus head.
async fn start_of(
    state: &AppState,
    last_event_id: Option<&str>,
    targets: &[Target],
) -> Option<Start> {
    let start = match last_event_id {
        Some(value) => match StreamPosition::parse(value, targets) {
            Ok(from) => Start::After { from, fresh: false },
            Err(PositionError::TargetsChanged) => Start::Lost(LostReason::TargetsChanged),
            Err(_) => Start::Lost(LostReason::UnrecognisedId),
        },
        None => match state.bus.head().await {
            Ok(id) => Start::After {
                from: StreamPosition::at(id, targets.len()),
                fresh: true,
            },
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the bus head for a new stream");
                return None;
            }
        },
    };
    Some(start)
}

/// The answer to a stream the registry has no room for.
fn refuse(state: &AppState, err: AttachError) -> Result<Response, Rejection> {
    match err {
        AttachError::NodeFull(_) => Ok(come_back_later(state, "node_full")),
        AttachError::UserFull(_) => {
            state
                .metrics
                .rejected_streams
                .get_or_create(&ReasonLabel {
                    reason: "user_full",
                })
                .inc();
            Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                err.to_string(),
            )
            .retry_after(5)
            .into())
        }
    }
}

/// The user's own target first, then each requested topic the token grants,
/// sorted by name.
fn targets(
    state: &AppState,
    subscriber: &crate::auth::Subscriber,
    topics: &[String],
) -> Result<Vec<Target>, ApiError> {
    let max = state.settings.stream.max_topics;
    if topics.len() > max {
        return Err(ApiError::bad_request(
            "too_many_topics",
            format!("a stream may follow at most {max} topics"),
        ));
    }
    let mut targets = vec![subscriber.user.clone()];
    for name in topics {
        let topic = Target::topic(name.as_str())
            .map_err(|err| ApiError::bad_request("invalid_topic", err.to_string()))?;
        if !subscriber.may_follow(name) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "the token does not grant one of the requested topics",
            ));
        }
        if !targets.contains(&topic) {
            targets.push(topic);
        }
    }
    // One order whatever the query's: the id lists one position per target
    // in this order.
    targets[1..].sort();
    Ok(targets)
}

/// Why a stream's targets are not delivered live (the stream is refused
/// with a "come back later"; its attachment is dropped).
#[derive(Debug, thiserror::Error)]
enum FollowFailure {
    /// The bus did not answer within [`FOLLOW_TIMEOUT`].
    #[error("timed out")]
    TimedOut,
    /// The bus dropped the request without an answer.
    #[error("the bus dropped the follow request")]
    Dropped,
    /// The bus could not set live delivery up.
    #[error(transparent)]
    Failed(Arc<FollowError>),
}

/// Waits until the bus delivers every one of the stream's targets live.
async fn wait_until_followed(
    follows: Vec<tokio::sync::watch::Receiver<FollowState>>,
) -> Result<(), FollowFailure> {
    for mut follow in follows {
        let state = tokio::time::timeout(
            FOLLOW_TIMEOUT,
            follow.wait_for(|state| !matches!(state, FollowState::Pending)),
        )
        .await
        .map_err(|_| FollowFailure::TimedOut)?
        .map_err(|_| FollowFailure::Dropped)?
        .clone();
        if let FollowState::Failed(error) = state {
            return Err(FollowFailure::Failed(error));
        }
    }
    Ok(())
}

/// Keeps a connection registered; dropping it (the client left, the stream
/// ended) detaches it from the registry and logs the close.
struct Attachment {
    state: Arc<AppState>,
    id: u64,
    targets: Vec<Target>,
    expires_at: SystemTime,
    kill: Kill,
    reason: DisconnectReason,
    opened: Instant,
}

impl Attachment {
    /// Counts and logs the stream as open (its close is logged on drop).
    fn opened(&self, resumed: bool) {
        let state = &self.state;
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
fn session(
    attachment: Attachment,
    frames: mpsc::Receiver<Queued>,
    start: Start,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + Sync + 'static {
    let stream = async_stream::stream! {
        let (mut session, replay) = match Session::begin(attachment, frames, start).await {
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

        let heartbeat = tokio::time::sleep(session.heartbeat_every);
        let (expiry_warning, expiry) = session.expiry_timers();
        let drained = drained(Arc::clone(&session.state));
        tokio::pin!(heartbeat, expiry_warning, expiry, drained);
        let mut waits = Waits { heartbeat, expiry_warning, expiry, drained };
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
                    let every = session.heartbeat_every;
                    waits.heartbeat.as_mut().reset(tokio::time::Instant::now() + every);
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
    frames: mpsc::Receiver<Queued>,
    /// Bytes waiting to be yielded as one write.
    buf: BytesMut,
    cursor: Cursor,
    /// `stream.max_batch_bytes`: a batch ends once it holds this much.
    batch_limit: usize,
    heartbeat_every: Duration,
    /// The expiry warning was written.
    warned: bool,
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
struct Waits<'a, D> {
    heartbeat: Pin<&'a mut Sleep>,
    expiry_warning: Pin<&'a mut Sleep>,
    expiry: Pin<&'a mut Sleep>,
    /// The node going away ([`drained`]).
    drained: Pin<&'a mut D>,
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
        frames: mpsc::Receiver<Queued>,
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
            warned: false,
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
        self.state.written(self.buf.split().freeze(), 0)
    }

    /// The token's expiry warning and its end: tokens are accepted until
    /// `exp` plus the leeway (whole seconds), so the stream lives exactly as
    /// long as its token would still open one.
    fn expiry_timers(&self) -> (Sleep, Sleep) {
        let auth = &self.state.settings.auth;
        let expires_at = self.attachment.expires_at;
        let accepted_until = expires_at + Duration::from_secs(auth.leeway_secs + 1);
        let expiry = deadline(accepted_until, Duration::ZERO);
        let warning = Duration::from_secs(auth.expiry_warning_secs);
        let expiry_warning = tokio::time::sleep_until(deadline(expires_at, warning));
        (expiry_warning, tokio::time::sleep_until(expiry))
    }

    /// Waits for what the stream does next. Progress moves the cursor on
    /// the way (the client hears of it at the next heartbeat).
    async fn next_step<D: Future<Output = ()>>(&mut self, waits: &mut Waits<'_, D>) -> Step {
        loop {
            let queued = tokio::select! {
                biased;
                _ = self.attachment.kill.killed() => return Step::End,
                _ = waits.drained.as_mut() => return Step::Leave(DisconnectReason::Shutdown),
                _ = waits.expiry.as_mut() => return Step::Expired,
                _ = waits.expiry_warning.as_mut(), if !self.warned => return Step::ExpiryWarning,
                queued = self.frames.recv() => queued,
                _ = waits.heartbeat.as_mut() => return Step::Heartbeat,
            };
            match queued {
                Some(Queued::Event(frame)) => return Step::Frame(frame),
                Some(Queued::Progress { slot, through }) => self.cursor.advance(slot, through),
                Some(Queued::Leave(reason)) => return Step::Leave(reason),
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
                Ok(Queued::Event(frame)) => return Ok(Some(frame)),
                Ok(Queued::Progress { slot, through }) => self.cursor.advance(slot, through),
                Ok(Queued::Leave(reason)) => return Err(reason),
                Err(_) => break,
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
        self.buf.split().freeze()
    }

    /// Writes the token's expiry warning (once).
    fn expiry_warning(&mut self) -> Bytes {
        self.warned = true;
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
struct Cursor {
    position: StreamPosition,
    fingerprint: u16,
    /// Ids are the events' own (one target, or one global order).
    own_ids: bool,
    /// The position as the client last saw it in an id.
    told: Vec<u64>,
}

/// What [`Cursor::write`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Written {
    /// Appended, with its id.
    Yes,
    /// Already written (or not for this stream): nothing appended.
    Skipped,
    /// From another epoch than the stream's positions: the history changed
    /// under the stream, which must end so its client is told.
    OtherEpoch,
}

impl Cursor {
    fn new(position: StreamPosition, targets: &[Target], in_order: bool) -> Self {
        let told = position.seqs.clone();
        Cursor {
            position,
            fingerprint: fingerprint_of(targets),
            own_ids: targets.len() == 1 || in_order,
            told,
        }
    }

    /// Appends `event` (for the stream's target `slot`) unless already written.
    fn write(&mut self, slot: u32, event: &Event, buf: &mut BytesMut) -> Written {
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
        self.told.clone_from(&self.position.seqs);
        Written::Yes
    }

    /// Every event of target `slot` up to `through` has been written.
    fn advance(&mut self, slot: u32, through: u64) {
        if let Some(at) = self.position.seqs.get_mut(slot as usize) {
            *at = (*at).max(through);
        }
    }

    /// Every event of every target up to `through` has been written.
    fn advance_all(&mut self, through: u64) {
        for at in &mut self.position.seqs {
            *at = (*at).max(through);
        }
    }

    /// Appends an id-only frame with the current position.
    fn write_id(&mut self, buf: &mut BytesMut) {
        buf.extend_from_slice(b"id: ");
        self.write_position(buf);
        buf.extend_from_slice(b"\n\n");
        self.told.clone_from(&self.position.seqs);
    }

    /// Appends an id-only frame if the position moved since the client was
    /// last told it; returns whether it did.
    fn write_id_if_moved(&mut self, buf: &mut BytesMut) -> bool {
        if self.told == self.position.seqs {
            return false;
        }
        self.write_id(buf);
        true
    }

    fn write_position(&self, buf: &mut BytesMut) {
        let mut id = String::with_capacity(48);
        // Writing into a String cannot fail.
        let _ = self.position.write(self.fingerprint, &mut id);
        buf.extend_from_slice(id.as_bytes());
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
            if head.epoch != cursor.position.epoch {
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
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=window))).await;
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

/// Adds the SSE headers to a streaming response.
fn sse_response(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert("cache-control", HeaderValue::from_static("no-cache"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

/// A 200 stream that only says "retry later" and ends. Used for passing
/// refusals (node full, draining, bus down): a browser's EventSource treats any
/// non-200 answer as final, but reconnects after a stream that ends.
fn come_back_later(state: &AppState, reason: &'static str) -> Response {
    state
        .metrics
        .rejected_streams
        .get_or_create(&ReasonLabel { reason })
        .inc();
    let mut buf = BytesMut::new();
    sse::write_comment(&mut buf, reason);
    sse::write_retry(&mut buf, state.retry_hint_ms());
    sse_response(Response::new(buf.freeze().into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use herald_protocol::Epoch;

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
