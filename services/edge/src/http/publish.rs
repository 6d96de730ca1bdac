//! `POST /v1/publish`: publish an event over HTTP with a publisher credential.
//!
//! Body (JSON, at most `http.max_body_bytes`):
//! `{"user": "..."}` or `{"topic": "..."}` (exactly one), `"data"` (required: a
//! string is sent as is, any other JSON value as its compact JSON text),
//! `"event"` (optional SSE event type), `"msg_id"` (optional idempotency key).
//! Answers `{"id": "<sse id>", "duplicate": false}` once the bus stored the event.
//!
//! Every field is validated before anything is built from it: a value that
//! could not travel unchanged in a NATS subject, a NATS header or the SSE
//! framing is a 400 whose code names the field (`invalid_user`,
//! `invalid_topic`, `invalid_event`, `invalid_msg_id`), never a panic further
//! down. The `msg_id` reaches the bus only as a key scoped to the publisher
//! and the target (see [`super::idempotency`]).

use std::borrow::Cow;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use herald_protocol::{EventType, MsgId, Target, TargetKind, TraceParent};
use serde::Deserialize;
use warp::Rejection;
use warp::http::header::CONTENT_TYPE;
use warp::http::{HeaderMap, HeaderValue, StatusCode};
use warp::reply::Response;

use super::AppState;
use super::credentials::require_publisher;
use super::errors::ApiError;
use super::event_data::EventData;
use super::idempotency::dedup_key;
use crate::auth::{Publisher, PublisherId};
use crate::bus::{PublishError, PublishRequest, Receipt};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    // Borrowed from the body where they need no unescaping: the target's
    // name is then copied once, into the target.
    #[serde(borrow)]
    user: Option<Cow<'a, str>>,
    #[serde(borrow)]
    topic: Option<Cow<'a, str>>,
    event: Option<String>,
    data: EventData,
    msg_id: Option<String>,
}

/// Handles `POST /v1/publish`.
pub(crate) async fn publish(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: impl Stream<Item = Result<impl Buf, warp::Error>> + Send + Unpin,
) -> Result<Response, Rejection> {
    let (publisher, body) = publisher_request(&state, &headers, body).await?;
    let publication = parse(&body)?;
    if !publisher.may_publish(&publication.target) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this credential may not publish to {}",
                publication.target.kind().as_str()
            ),
        )
        .into());
    }
    let target = publication.target.clone();
    let request = publication.into_request(&publisher.id, trace_context(&headers));
    match state.bus.publish(request).await {
        Ok(receipt) => {
            if !receipt.duplicate {
                state.metrics.events_published.inc();
            }
            tracing::debug!(%target, id = %receipt.id, duplicate = receipt.duplicate, "published");
            Ok(receipt_response(receipt))
        }
        Err(err) => Err(not_published(err, &target).into()),
    }
}

/// The answer to a stored publish: what `warp::reply::json` of the object
/// wrote (its keys sorted), without building a JSON value, a formatter or a
/// parsed header per publish: the id is hex digits, a dash and digits,
/// nothing to escape.
fn receipt_response(receipt: Receipt) -> Response {
    let id = receipt.id.encode();
    let opening: &[u8] = if receipt.duplicate {
        br#"{"duplicate":true,"id":""#
    } else {
        br#"{"duplicate":false,"id":""#
    };
    let mut body = Vec::with_capacity(opening.len() + id.as_bytes().len() + 2);
    body.extend_from_slice(opening);
    body.extend_from_slice(id.as_bytes());
    body.extend_from_slice(br#""}"#);
    let mut response = Response::new(body.into());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// What every publisher endpoint with a body does first: the publisher
/// ([`require_publisher`]), one turn of its rate ([`take_turn`]), and the body
/// read within `http.max_body_bytes` ([`read_limited`]).
pub(super) async fn publisher_request(
    state: &AppState,
    headers: &HeaderMap,
    body: impl Stream<Item = Result<impl Buf, warp::Error>> + Send + Unpin,
) -> Result<(Arc<Publisher>, Bytes), ApiError> {
    let publisher = require_publisher(&state.auth, headers).await?;
    take_turn(state, &publisher)?;
    let body = read_limited(body, headers, state.settings.http.max_body_bytes).await?;
    Ok((publisher, body))
}

/// Counts one request against the publisher's rate (`http.publish_rate_per_sec`,
/// shared by every publisher endpoint): 429 with `Retry-After` when over it.
fn take_turn(state: &AppState, publisher: &Publisher) -> Result<(), ApiError> {
    state.throttle.take(publisher.rate_key()).map_err(|wait| {
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "this credential may publish {} events per second",
                state.settings.http.publish_rate_per_sec
            ),
        )
        .retry_after(wait.as_secs().max(1))
    })
}

/// The answer to a publish the bus refused.
fn not_published(err: PublishError, target: &Target) -> ApiError {
    match err {
        err @ PublishError::TooLarge { .. } => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "event_too_large",
            err.to_string(),
        ),
        err @ PublishError::Invalid { field } => ApiError::bad_request(
            match field {
                "msg_id" => "invalid_msg_id",
                "event" => "invalid_event",
                _ => "invalid_request",
            },
            err.to_string(),
        ),
        err @ PublishError::Unavailable(_) => {
            tracing::warn!(%target, error = %err, "publish failed");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "bus_unavailable",
                err.to_string(),
            )
            .retry_after(1)
        }
    }
}

/// Reads the body, refusing it as soon as it is known to exceed `limit` bytes
/// (by `Content-Length` or while streaming a chunked body).
async fn read_limited(
    mut body: impl Stream<Item = Result<impl Buf, warp::Error>> + Send + Unpin,
    headers: &HeaderMap,
    limit: u64,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is larger than {limit} bytes"),
        )
    };
    let declared = headers
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(too_large());
    }
    let mut collected = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|err| {
            ApiError::bad_request("unreadable_body", format!("could not read the body: {err}"))
        })?;
        if collected.len() as u64 + chunk.remaining() as u64 > limit {
            return Err(too_large());
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            collected.extend_from_slice(part);
            let read = part.len();
            chunk.advance(read);
        }
    }
    Ok(collected.freeze())
}

/// A validated publish body, before it is scoped to its publisher.
#[derive(Debug)]
struct Publication {
    target: Target,
    event_type: Option<EventType>,
    data: String,
    msg_id: Option<MsgId>,
}

impl Publication {
    /// The bus request: the `msg_id` becomes its key scoped to `publisher`
    /// and the target, so it deduplicates only that publisher's retries.
    fn into_request(self, publisher: &PublisherId, trace: Option<TraceParent>) -> PublishRequest {
        PublishRequest {
            msg_id: self
                .msg_id
                .map(|msg_id| dedup_key(publisher, &self.target, &msg_id)),
            target: self.target,
            event_type: self.event_type,
            data: self.data,
            trace,
        }
    }
}

/// Validates a JSON body into a publication; every refusal names its field.
fn parse(body: &[u8]) -> Result<Publication, ApiError> {
    let body: PublishBody<'_> = serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request("invalid_json", format!("invalid body: {err}")))?;
    let (kind, name) = match (body.user, body.topic) {
        (Some(user), None) => (TargetKind::User, user),
        (None, Some(topic)) => (TargetKind::Topic, topic),
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "ambiguous_target",
                "give either \"user\" or \"topic\", not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::bad_request(
                "missing_target",
                "give a \"user\" or a \"topic\" to publish to",
            ));
        }
    };
    let target = Target::new(kind, &name).map_err(|err| {
        let code = match kind {
            TargetKind::User => "invalid_user",
            TargetKind::Topic => "invalid_topic",
        };
        ApiError::bad_request(code, err.to_string())
    })?;
    let event_type = body
        .event
        .map(EventType::new)
        .transpose()
        .map_err(|err| ApiError::bad_request("invalid_event", err.to_string()))?;
    let msg_id = body
        .msg_id
        .map(MsgId::new)
        .transpose()
        .map_err(|err| ApiError::bad_request("invalid_msg_id", err.to_string()))?;
    let data = body.data.0;
    Ok(Publication {
        target,
        event_type,
        data,
        msg_id,
    })
}

/// The publisher's W3C trace context from `traceparent` / `tracestate`.
fn trace_context(headers: &HeaderMap) -> Option<TraceParent> {
    let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
    TraceParent::parse(header("traceparent")?, header("tracestate"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use warp::Reply;

    fn code(body: &str) -> &'static str {
        parse(body.as_bytes()).expect_err("refused").code
    }

    #[test]
    fn a_string_is_sent_as_is_and_other_values_as_compact_json() {
        let text = parse(br#"{"user":"alice","data":"hello\nworld"}"#).expect("valid");
        assert_eq!(text.data, "hello\nworld");
        let object =
            parse(br#"{"topic":"news","data":{"a": [1, 2]},"event":"update","msg_id":"m-1"}"#)
                .expect("valid");
        assert_eq!(object.data, r#"{"a":[1,2]}"#);
        assert_eq!(object.target, Target::topic("news").expect("valid"));
        assert_eq!(
            object.event_type.map(|t| t.to_string()),
            Some("update".into())
        );
        assert_eq!(object.msg_id.map(|id| id.to_string()), Some("m-1".into()));
    }

    #[test]
    fn bad_bodies_are_refused_with_a_code_naming_the_field() {
        assert_eq!(code("not json"), "invalid_json");
        assert_eq!(code(r#"{"data":"x"}"#), "missing_target");
        assert_eq!(
            code(r#"{"user":"a","topic":"b","data":"x"}"#),
            "ambiguous_target"
        );
        assert_eq!(code(r#"{"user":"a"}"#), "invalid_json");
        assert_eq!(code(r#"{"user":"a","data":"x","extra":1}"#), "invalid_json");
        assert_eq!(code(r#"{"user":"","data":"x"}"#), "invalid_user");
        assert_eq!(code(r#"{"user":"a\u0000b","data":"x"}"#), "invalid_user");
        assert_eq!(code(r#"{"topic":"a\r\nb","data":"x"}"#), "invalid_topic");
        assert_eq!(
            code(r#"{"user":"a","data":"x","event":"a\r\ndata: evil"}"#),
            "invalid_event"
        );
        assert_eq!(
            code(r#"{"user":"a","data":"x","event":"herald.reset"}"#),
            "invalid_event"
        );
        assert_eq!(
            code(r#"{"user":"a","data":"x","event":"HERALD.reset"}"#),
            "invalid_event"
        );
        assert_eq!(
            code(r#"{"user":"a","data":"x","msg_id":""}"#),
            "invalid_msg_id"
        );
        assert_eq!(
            code(r#"{"user":"a","data":"x","msg_id":"m0\r\nX-Injected: 1"}"#),
            "invalid_msg_id"
        );
        let long = format!(
            r#"{{"user":"a","data":"x","msg_id":"{}"}}"#,
            "m".repeat(herald_protocol::msg_id::MAX_MSG_ID_BYTES + 1)
        );
        assert_eq!(code(&long), "invalid_msg_id");
    }

    #[tokio::test]
    async fn the_receipt_is_what_warp_json_of_it_wrote() {
        for duplicate in [false, true] {
            let receipt = Receipt {
                id: herald_protocol::EventId {
                    epoch: herald_protocol::Epoch(0x18c3f2a1),
                    seq: 42,
                },
                duplicate,
            };
            let response = receipt_response(receipt);
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(
                response.headers().get(CONTENT_TYPE),
                Some(&HeaderValue::from_static("application/json"))
            );
            let body = http_body_util::BodyExt::collect(response.into_body())
                .await
                .expect("in memory")
                .to_bytes();
            let expected = warp::reply::json(&serde_json::json!({
                "id": receipt.id.to_string(),
                "duplicate": duplicate,
            }))
            .into_response();
            let expected = http_body_util::BodyExt::collect(expected.into_body())
                .await
                .expect("in memory")
                .to_bytes();
            assert_eq!(body, expected);
        }
    }

    #[test]
    fn the_bus_sees_the_msg_id_only_as_a_key_scoped_to_publisher_and_target() {
        let body = br#"{"user":"alice","data":"x","msg_id":"order-42"}"#;
        let request = |publisher: &str| {
            parse(body)
                .expect("valid")
                .into_request(&PublisherId::Subject(publisher.into()), None)
        };
        let billing = request("billing").msg_id.expect("keyed");
        assert_ne!(billing, "order-42");
        assert_eq!(Some(billing.clone()), request("billing").msg_id);
        assert_ne!(Some(billing), request("mallory").msg_id);
        let without = parse(br#"{"user":"alice","data":"x"}"#)
            .expect("valid")
            .into_request(&PublisherId::Subject("billing".into()), None);
        assert_eq!(without.msg_id, None);
    }
}
