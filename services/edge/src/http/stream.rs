//! `GET /v1/stream`: one client's SSE stream.
//!
//! Opening a stream, in order:
//! 1. authenticate the token (header, `access_token` query or cookie), refuse
//!    a revoked one with 204 (an `EventSource` then stops for good), and work
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
//!
//! This file opens the stream (steps 1 to 3); [`session`] writes it (step 4
//! on) and keeps it registered; [`cursor`] decides which events it writes
//! and the id each carries.

mod cursor;
mod session;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use herald_protocol::{PositionError, StreamPosition, Target, sse};
use warp::http::{HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;
use warp::{Rejection, Reply};

use super::AppState;
use super::credentials::{bearer_token, cookie_token};
use super::errors::ApiError;
use crate::bus::nats::FollowError;
use crate::bus::{FollowState, LostReason};
use crate::metrics::ReasonLabel;
use crate::registry::{AttachError, ConnectionHandle, Kill};
use session::{Attachment, Start};

/// How long to wait for the bus to start live delivery of a stream's targets.
const FOLLOW_TIMEOUT: Duration = Duration::from_secs(10);

/// What the client asked for, read from the request.
#[derive(Debug, Default)]
pub struct StreamRequest {
    /// The token: `Authorization: Bearer`, else `access_token`, else the cookie.
    pub(crate) token: Option<String>,
    /// Every `topic=` parameter, in order.
    pub(crate) topics: Vec<String>,
    /// `Last-Event-ID` header, else the `last_event_id` parameter.
    pub(crate) last_event_id: Option<String>,
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

/// Handles `GET /v1/stream`.
pub(crate) async fn open(
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
    let subscriber = match state.auth.subscriber(token).await {
        // Not the token's fault: the browser retries by itself (elsewhere,
        // through a load balancer: this node is unready meanwhile).
        Err(crate::auth::AuthError::KeysUnavailable) => {
            return Ok(come_back_later(&state, "keys_unavailable"));
        }
        verified => verified.map_err(ApiError::from)?,
    };
    if state.disconnects.refuses(&subscriber) {
        return Ok(revoked(&state, &subscriber));
    }
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
    // A revocation carried out here after the check above ended the streams
    // it found in the registry, which may have been before this one was
    // attached; it is in the copy the check reads by now, so ask again.
    if state.disconnects.refuses(&subscriber) {
        state.registry.detach(id, &targets, &*state.bus);
        return Ok(revoked(&state, &subscriber));
    }
    let attachment = Attachment::new(Arc::clone(&state), id, targets, subscriber.expires_at, kill);
    if let Err(problem) = wait_until_followed(follows).await {
        tracing::warn!(connection = id, %problem, "bus could not follow the stream's targets");
        drop(attachment);
        return Ok(come_back_later(&state, "bus_unavailable"));
    }
    attachment.opened(request.last_event_id.is_some());
    let body = session::body(attachment, frames, start);
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

/// The answer to a revoked token: 204 No Content, on which a browser's
/// `EventSource` closes for good instead of reconnecting (a 401 would make
/// the page fetch a new token, which a revoked user should not be handed
/// without the application deciding so).
fn revoked(state: &AppState, subscriber: &crate::auth::Subscriber) -> Response {
    state.metrics.revoked_refusals.inc();
    tracing::info!(
        user = %state.tracing.user_for_logs(&subscriber.user),
        "stream refused: the token was revoked"
    );
    warp::reply::with_status(warp::reply(), StatusCode::NO_CONTENT).into_response()
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
