//! `POST /v1/publish`: publish an event over HTTP with a publisher credential.
//!
//! Body (JSON, at most `http.max_body_bytes`):
//! `{"user": "..."}` or `{"topic": "..."}` (exactly one), `"data"` (required: a
//! string is sent as is, any other JSON value as its compact JSON text),
//! `"event"` (optional SSE event type), `"msg_id"` (optional idempotency key).
//! Answers `{"id": "<sse id>", "duplicate": false}` once the bus stored the event.

use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Stream, StreamExt};
use herald_protocol::{EventType, Target, TraceParent};
use serde::Deserialize;
use serde_json::json;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Rejection, Reply};

use super::AppState;
use super::errors::ApiError;
use super::stream::bearer_token;
use crate::bus::{PublishError, PublishRequest};

/// Longest accepted `msg_id`, bytes.
pub const MAX_MSG_ID_BYTES: usize = 256;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    user: Option<String>,
    topic: Option<String>,
    event: Option<String>,
    data: serde_json::Value,
    msg_id: Option<String>,
}

/// Handles `POST /v1/publish`.
pub async fn publish(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: impl Stream<Item = Result<impl Buf, warp::Error>> + Send + Unpin,
) -> Result<Response, Rejection> {
    let token = bearer_token(&headers)?.ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "no credential: send Authorization: Bearer <publisher jwt>",
        )
    })?;
    let publisher = state.auth.publisher(&token).map_err(ApiError::from)?;
    if let Err(wait) = state.throttle.take(&publisher.id.to_string()) {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "this credential may publish {} events per second",
                state.settings.http.publish_rate_per_sec
            ),
        )
        .retry_after(wait.as_secs().max(1))
        .into());
    }
    let body = read_limited(body, &headers, state.settings.http.max_body_bytes).await?;
    let mut request = parse(&body)?;
    request.trace = trace_context(&headers);
    if !publisher.may_publish(&request.target) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this credential may not publish to {}",
                request.target.kind().as_str()
            ),
        )
        .into());
    }
    let target = request.target.clone();
    match state.bus.publish(request).await {
        Ok(receipt) => {
            if !receipt.duplicate {
                state.metrics.events_published.inc();
            }
            tracing::debug!(%target, id = %receipt.id, duplicate = receipt.duplicate, "published");
            Ok(warp::reply::json(&json!({
                "id": receipt.id.to_string(),
                "duplicate": receipt.duplicate,
            }))
            .into_response())
        }
        Err(err @ PublishError::TooLarge { .. }) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "event_too_large",
            err.to_string(),
        )
        .into()),
        Err(err @ PublishError::Unavailable(_)) => {
            tracing::warn!(%target, error = %err, "publish failed");
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "bus_unavailable",
                err.to_string(),
            )
            .retry_after(1)
            .into())
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

/// Validates a JSON body into a publish request.
fn parse(body: &[u8]) -> Result<PublishRequest, ApiError> {
    let body: PublishBody = serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request("invalid_json", format!("invalid body: {err}")))?;
    let target = match (body.user, body.topic) {
        (Some(user), None) => Target::user(user),
        (None, Some(topic)) => Target::topic(topic),
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
    }
    .map_err(|err| ApiError::bad_request("invalid_target", err.to_string()))?;
    let event_type = body
        .event
        .map(EventType::new)
        .transpose()
        .map_err(|err| ApiError::bad_request("invalid_event", err.to_string()))?;
    if body
        .msg_id
        .as_ref()
        .is_some_and(|id| id.is_empty() || id.len() > MAX_MSG_ID_BYTES)
    {
        return Err(ApiError::bad_request(
            "invalid_msg_id",
            format!("msg_id must be 1 to {MAX_MSG_ID_BYTES} bytes"),
        ));
    }
    let data = match body.data {
        serde_json::Value::String(text) => text,
        other => other.to_string(),
    };
    Ok(PublishRequest {
        target,
        event_type,
        data,
        msg_id: body.msg_id,
        trace: None,
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
        assert_eq!(object.msg_id.as_deref(), Some("m-1"));
    }

    #[test]
    fn bad_bodies_are_refused_with_a_code_naming_the_problem() {
        assert_eq!(code("not json"), "invalid_json");
        assert_eq!(code(r#"{"data":"x"}"#), "missing_target");
        assert_eq!(
            code(r#"{"user":"a","topic":"b","data":"x"}"#),
            "ambiguous_target"
        );
        assert_eq!(code(r#"{"user":"a"}"#), "invalid_json");
        assert_eq!(code(r#"{"user":"a","data":"x","extra":1}"#), "invalid_json");
        assert_eq!(code(r#"{"user":"","data":"x"}"#), "invalid_target");
        assert_eq!(
            code(r#"{"user":"a","data":"x","event":"a\r\ndata: evil"}"#),
            "invalid_event"
        );
        assert_eq!(
            code(r#"{"user":"a","data":"x","event":"herald.reset"}"#),
            "invalid_event"
        );
        assert_eq!(
            code(r#"{"user":"a","data":"x","msg_id":""}"#),
            "invalid_msg_id"
        );
    }
}
