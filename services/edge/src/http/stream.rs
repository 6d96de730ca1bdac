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
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use herald_protocol::{EventId, Target, sse};
use serde_json::json;
use warp::http::{HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Rejection, Reply};

use super::AppState;
use super::credentials::{bearer_token, cookie_token};
use super::errors::ApiError;
use crate::bus::{Event, FollowState, LostReason, Replay};
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
#[derive(Debug, Clone, Copy)]
enum Start {
    /// Replay everything after this id (the client's, or the head for a fresh
    /// stream); `fresh` streams are told their position with an id-only frame.
    After { id: EventId, fresh: bool },
    /// The client sent an id Herald did not write: reset.
    Unrecognised,
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
    let start = match request.last_event_id.as_deref() {
        Some(value) => value
            .parse::<EventId>()
            .map_or(Start::Unrecognised, |id| Start::After { id, fresh: false }),
        None => match state.bus.head().await {
            Ok(id) => Start::After { id, fresh: true },
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the bus head for a new stream");
                return Ok(come_back_later(&state, "bus_unavailable"));
            }
        },
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
        Err(AttachError::NodeFull(_)) => return Ok(come_back_later(&state, "node_full")),
        Err(err @ AttachError::UserFull(_)) => {
            state
                .metrics
                .rejected_streams
                .get_or_create(&ReasonLabel {
                    reason: "user_full",
                })
                .inc();
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                err.to_string(),
            )
            .retry_after(5)
            .into());
        }
    };
    let attachment = Attachment {
        state: Arc::clone(&state),
        id,
        targets,
        expires_at: subscriber.expires_at,
        kill: kill.clone(),
        reason: DisconnectReason::ClientClosed,
        opened: Instant::now(),
    };
    if let Err(problem) = wait_until_followed(follows).await {
        tracing::warn!(connection = id, %problem, "bus could not follow the stream's targets");
        drop(attachment);
        return Ok(come_back_later(&state, "bus_unavailable"));
    }
    state.metrics.connects.inc();
    let user = &attachment.targets[0];
    let topics = attachment.targets.len() - 1;
    let resumed = request.last_event_id.is_some();
    tracing::info!(
        connection = id,
        user = %state.tracing.user_for_logs(user),
        topics,
        resume = resumed,
        "stream opened"
    );
    state.tracing.stream_opened(id, user, topics, resumed);
    let body = session(attachment, frames, start, kill);
    Ok(sse_response(warp::reply::stream(body).into_response()))
}

/// The user's own target first, then each requested topic the token grants.
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
    Ok(targets)
}

async fn wait_until_followed(
    follows: Vec<tokio::sync::watch::Receiver<FollowState>>,
) -> Result<(), String> {
    for mut follow in follows {
        let state = tokio::time::timeout(
            FOLLOW_TIMEOUT,
            follow.wait_for(|state| *state != FollowState::Pending),
        )
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|_| "the bus dropped the follow request".to_owned())?
        .clone();
        if let FollowState::Failed(problem) = state {
            return Err(problem);
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

/// The body of one stream; see the module docs for the sequence.
fn session(
    mut attachment: Attachment,
    mut frames: tokio::sync::mpsc::Receiver<Queued>,
    start: Start,
    kill: Kill,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + Sync + 'static {
    let state = Arc::clone(&attachment.state);
    let stream = async_stream::stream! {
        let mut buf = BytesMut::with_capacity(512);
        sse::write_comment(&mut buf, "herald stream");
        sse::write_retry(&mut buf, state.retry_hint_ms());

        let (replayed, cursor) = match begin(&state, attachment.id, &attachment.targets, start, &mut buf).await {
            Ok(begun) => begun,
            Err(problem) => {
                tracing::warn!(connection = attachment.id, %problem, "replay failed; client will retry");
                attachment.end_because(DisconnectReason::BusUnavailable);
                yield Ok(buf.split().freeze());
                return;
            }
        };
        let batch_limit = state.settings.stream.max_batch_bytes;
        for event in &replayed {
            buf.extend_from_slice(&event.frame);
            state.delivered(event, attachment.id, &attachment.targets[0], true, Duration::ZERO);
            if buf.len() >= batch_limit {
                yield Ok(state.written(buf.split().freeze(), 0));
            }
        }
        state.metrics.events_delivered.inc_by(replayed.len() as u64);
        drop(replayed);
        yield Ok(state.written(buf.split().freeze(), 0));

        let heartbeat_every = Duration::from_millis(state.settings.stream.heartbeat_ms);
        let heartbeat = tokio::time::sleep(heartbeat_every);
        tokio::pin!(heartbeat);
        let mut cursor = Cursor::new(attachment.targets.len(), cursor);
        // Tokens are accepted until `exp` plus the leeway (whole seconds), so the
        // stream lives exactly as long as its token would still open one.
        let accepted_until = attachment.expires_at
            + Duration::from_secs(state.settings.auth.leeway_secs + 1);
        let expiry = deadline(accepted_until, Duration::ZERO);
        let warning = Duration::from_secs(state.settings.auth.expiry_warning_secs);
        let expiry_warning = tokio::time::sleep_until(deadline(attachment.expires_at, warning));
        let expiry = tokio::time::sleep_until(expiry);
        tokio::pin!(expiry_warning, expiry);
        let mut warned = false;
        let drained = drained(Arc::clone(&state));
        tokio::pin!(drained);
        loop {
            let step = tokio::select! {
                biased;
                _ = kill.killed() => Step::End,
                _ = drained.as_mut() => Step::Leave(DisconnectReason::Shutdown),
                _ = expiry.as_mut() => Step::Expired,
                _ = expiry_warning.as_mut(), if !warned => Step::ExpiryWarning,
                queued = frames.recv() => match queued {
                    Some(Queued::Event(frame)) => Step::Frame(frame),
                    Some(Queued::Leave(reason)) => Step::Leave(reason),
                    None => Step::End,
                },
                _ = heartbeat.as_mut() => Step::Heartbeat,
            };
            match step {
                Step::Frame(first) => {
                    let mut delivered = 0;
                    let mut leaving = None;
                    let mut next = Some(first);
                    while let Some(frame) = next.take() {
                        if cursor.write(&frame, &mut buf) {
                            delivered += 1;
                            state.delivered(&frame.event, attachment.id, &attachment.targets[0], false, frame.queued_at.elapsed());
                        }
                        if buf.len() < batch_limit {
                            next = match frames.try_recv() {
                                Ok(Queued::Event(frame)) => Some(frame),
                                Ok(Queued::Leave(reason)) => {
                                    leaving = Some(reason);
                                    None
                                }
                                Err(_) => None,
                            };
                        }
                    }
                    if let Some(reason) = leaving {
                        attachment.end_because(reason);
                        sse::write_retry(&mut buf, state.retry_hint_ms());
                        yield Ok(state.written(buf.split().freeze(), delivered));
                        break;
                    }
                    if buf.is_empty() {
                        continue;
                    }
                    yield Ok(state.written(buf.split().freeze(), delivered));
                }
                Step::Heartbeat => {
                    sse::write_comment(&mut buf, "");
                    yield Ok(buf.split().freeze());
                }
                Step::ExpiryWarning => {
                    warned = true;
                    write_expiry_warning(&mut buf, attachment.expires_at);
                    yield Ok(buf.split().freeze());
                }
                Step::Expired => {
                    attachment.end_because(DisconnectReason::TokenExpired);
                    break;
                }
                Step::Leave(reason) => {
                    attachment.end_because(reason);
                    sse::write_retry(&mut buf, state.retry_hint_ms());
                    yield Ok(buf.split().freeze());
                    break;
                }
                Step::End => break,
            }
            heartbeat.as_mut().reset(tokio::time::Instant::now() + heartbeat_every);
        }
    };
    sync_wrapper::SyncStream::new(stream)
}

/// What a connection has written, per target, so every event is written once.
///
/// Each target's events arrive in sequence order, and a frame at or below its
/// target's cursor was already written (by the replay or an earlier live
/// delivery). Across targets, a bus may hand over events slightly out of global
/// order (the NATS bus delivers each target from its own subscription); such a
/// late event is still written, and followed by an id-only frame restoring the
/// highest id written, so the browser's `Last-Event-ID` always names the
/// highest position and a resume never replays what was already written.
struct Cursor {
    per_target: Vec<u64>,
    highest: Option<EventId>,
}

impl Cursor {
    fn new(targets: usize, start: u64) -> Self {
        Cursor {
            per_target: vec![start; targets],
            highest: None,
        }
    }

    /// Appends `frame` to `buf` unless already written; returns whether it was.
    fn write(&mut self, frame: &Frame, buf: &mut BytesMut) -> bool {
        let Some(cursor) = self.per_target.get_mut(frame.slot as usize) else {
            return false;
        };
        let id = frame.event.id;
        if id.seq <= *cursor {
            return false;
        }
        *cursor = id.seq;
        buf.extend_from_slice(&frame.event.frame);
        match self.highest {
            Some(highest) if highest.seq > id.seq => {
                buf.extend_from_slice(format!("id: {highest}\n\n").as_bytes());
            }
            _ => self.highest = Some(id),
        }
        true
    }
}

enum Step {
    Frame(Frame),
    Heartbeat,
    ExpiryWarning,
    Expired,
    /// End with a `retry:` hint so the client reconnects (to another node).
    Leave(DisconnectReason),
    End,
}

/// Reads the replay for `start` and writes what comes before it (an id-only
/// frame for a fresh stream, or the reset) into `buf`. Returns the events to
/// send and the cursor after them.
async fn begin(
    state: &AppState,
    connection: u64,
    targets: &[Target],
    start: Start,
    buf: &mut BytesMut,
) -> Result<(Vec<Arc<Event>>, u64), String> {
    let limit = state.settings.stream.max_replay_events;
    let (after, fresh) = match start {
        Start::After { id, fresh } => (id, fresh),
        Start::Unrecognised => {
            let head = state.bus.head().await.map_err(|e| e.to_string())?;
            write_reset(state, buf, LostReason::UnrecognisedId, head);
            return Ok((Vec::new(), head.seq));
        }
    };
    let started = Instant::now();
    match state
        .bus
        .replay(targets, after, limit)
        .await
        .map_err(|e| e.to_string())?
    {
        Replay::Complete { events, .. } => {
            if fresh {
                // Tell the client where it starts, so a reconnect before any
                // event still resumes from here (an id-only frame dispatches
                // no event but sets the browser's last event id).
                buf.extend_from_slice(format!("id: {after}\n\n").as_bytes());
            } else if !events.is_empty() {
                state.metrics.replays.inc();
                state.metrics.replayed_events.inc_by(events.len() as u64);
                state
                    .tracing
                    .replayed(connection, events.len(), "complete", started.elapsed());
            }
            let cursor = events.last().map_or(after.seq, |event| event.id.seq);
            Ok((events, cursor))
        }
        Replay::HistoryLost { reason, head } => {
            state
                .tracing
                .replayed(connection, 0, reason.as_str(), started.elapsed());
            write_reset(state, buf, reason, head);
            Ok((Vec::new(), head.seq))
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

    fn frame(slot: u32, seq: u64) -> Frame {
        let target = Target::user("alice").expect("valid");
        let id = EventId {
            epoch: Epoch(1),
            seq,
        };
        Frame {
            event: Arc::new(Event::new(id, target, None, "x", SystemTime::now())),
            slot,
            queued_at: crate::registry::QueuedAt::now(),
        }
    }

    #[test]
    fn a_frame_already_written_for_its_target_is_skipped() {
        let mut cursor = Cursor::new(1, 5);
        let mut buf = BytesMut::new();
        assert!(!cursor.write(&frame(0, 5), &mut buf));
        assert!(cursor.write(&frame(0, 6), &mut buf));
        assert!(!cursor.write(&frame(0, 6), &mut buf));
        assert_eq!(&buf[..], b"id: 1-6\ndata: x\n\n");
    }

    #[test]
    fn a_late_event_of_another_target_is_written_then_the_highest_id_restored() {
        let mut cursor = Cursor::new(2, 0);
        let mut buf = BytesMut::new();
        assert!(cursor.write(&frame(1, 10), &mut buf));
        buf.clear();
        assert!(cursor.write(&frame(0, 9), &mut buf));
        assert_eq!(&buf[..], b"id: 1-9\ndata: x\n\nid: 1-10\n\n");
    }

    #[test]
    fn a_frame_for_an_unknown_slot_is_ignored() {
        let mut cursor = Cursor::new(1, 0);
        let mut buf = BytesMut::new();
        assert!(!cursor.write(&frame(3, 1), &mut buf));
        assert!(buf.is_empty());
    }
}
