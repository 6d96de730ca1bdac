//! `POST /v1/disconnect`: end a user's streams on every node, optionally
//! writing a reason event first and revoking the user's tokens.
//!
//! Body (JSON, at most `http.max_body_bytes`): `"user"` (required), `"reason"`
//! (optional: `{"type": "<SSE event type>", "data": <any JSON value or a
//! string>}`, `data` defaulting to `null`), `"revoke"` (optional boolean,
//! default false). The credential is a publisher's whose grant covers
//! `user:<id>`, and the request counts against its publish rate.
//!
//! Answers 202 `{"user", "revoked", "revoked_before"}` once the order is on
//! its way to every node (and the revocation stored): each node ends the
//! user's streams when the order reaches it, well within a second on a
//! healthy cluster. Nodes do not report back, so the answer counts nothing;
//! `GET /v1/presence/{user}` tells who still holds a stream.
//!
//! Every field is checked by hand rather than by serde, so a refusal's code
//! always names the field (`invalid_user`, `invalid_reason`, `invalid_revoke`,
//! `unknown_field`).

use std::sync::Arc;

use bytes::Buf;
use futures_util::Stream;
use herald_protocol::{EventType, Target};
use serde_json::{Map, Value, json};
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Rejection, Reply};

use super::AppState;
use super::errors::ApiError;
use super::publish::publisher_request;
use crate::cluster::disconnect::{DisconnectError, ReasonEvent};

/// A validated disconnect request.
#[derive(Debug, PartialEq)]
struct Disconnect {
    user: Target,
    reason: Option<ReasonEvent>,
    revoke: bool,
}

/// Handles `POST /v1/disconnect`.
pub(crate) async fn disconnect(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: impl Stream<Item = Result<impl Buf, warp::Error>> + Send + Unpin,
) -> Result<Response, Rejection> {
    let (publisher, body) = publisher_request(&state, &headers, body).await?;
    let request = parse(&body, state.settings.nats.max_event_bytes)?;
    if !publisher.may_publish(&request.user) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this credential may not publish to this user, so it may not disconnect them",
        )
        .into());
    }
    let user_label = state.tracing.user_for_logs(&request.user);
    match state
        .disconnects
        .disconnect(&request.user, request.reason, request.revoke)
        .await
    {
        Ok(revoked_before) => {
            tracing::info!(
                user = %user_label,
                publisher = %publisher.id,
                revoke = request.revoke,
                "disconnect order sent"
            );
            let body = json!({
                "user": request.user.name(),
                "revoked": revoked_before.is_some(),
                "revoked_before": revoked_before,
            });
            Ok(
                warp::reply::with_status(warp::reply::json(&body), StatusCode::ACCEPTED)
                    .into_response(),
            )
        }
        Err(err) => {
            tracing::warn!(user = %user_label, error = %err, "disconnect failed");
            let stored = !matches!(err, DisconnectError::Store(_)) && request.revoke;
            let message = if stored {
                format!("{err}; the revocation is stored, but open streams were not ended: retry")
            } else {
                err.to_string()
            };
            Err(
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "bus_unavailable", message)
                    .retry_after(1)
                    .into(),
            )
        }
    }
}

/// Validates a JSON body; every refusal names its field. `max_data_bytes`
/// bounds the reason's data as the bus bounds an event's.
fn parse(body: &[u8], max_data_bytes: usize) -> Result<Disconnect, ApiError> {
    let body: Value = serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request("invalid_json", format!("invalid body: {err}")))?;
    let Value::Object(mut fields) = body else {
        return Err(ApiError::bad_request(
            "invalid_json",
            "the body must be a JSON object",
        ));
    };
    let user = match fields.remove("user") {
        Some(Value::String(user)) => Target::user(user)
            .map_err(|err| ApiError::bad_request("invalid_user", err.to_string()))?,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_user",
                "\"user\" must be a string",
            ));
        }
        None => {
            return Err(ApiError::bad_request(
                "invalid_user",
                "give the \"user\" to disconnect",
            ));
        }
    };
    let revoke = match fields.remove("revoke") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(revoke)) => revoke,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_revoke",
                "\"revoke\" must be true or false",
            ));
        }
    };
    let reason = match fields.remove("reason") {
        None | Some(Value::Null) => None,
        Some(Value::Object(reason)) => Some(reason_event(reason, max_data_bytes)?),
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_reason",
                "\"reason\" must be an object {\"type\": \"...\", \"data\": ...}",
            ));
        }
    };
    if let Some(unknown) = fields.keys().next() {
        return Err(ApiError::bad_request(
            "unknown_field",
            format!("unknown field {unknown:?}: expected user, reason, revoke"),
        ));
    }
    Ok(Disconnect {
        user,
        reason,
        revoke,
    })
}

/// The `reason` object: `type` (an SSE event type a publisher may use) and
/// `data` (a string as is, any other JSON value as its compact text).
fn reason_event(
    mut reason: Map<String, Value>,
    max_data_bytes: usize,
) -> Result<ReasonEvent, ApiError> {
    let invalid = |message: String| ApiError::bad_request("invalid_reason", message);
    let event_type = match reason.remove("type") {
        Some(Value::String(name)) => EventType::new(name)
            .map_err(|err| invalid(format!("reason.type: {err}")))?
            .as_str()
            .to_owned(),
        Some(_) => return Err(invalid("reason.type must be a string".into())),
        None => return Err(invalid("reason.type is required".into())),
    };
    let data = match reason.remove("data").unwrap_or(Value::Null) {
        Value::String(text) => text,
        other => other.to_string(),
    };
    if data.len() > max_data_bytes {
        return Err(invalid(format!(
            "reason.data is {} bytes; the limit is {max_data_bytes}",
            data.len()
        )));
    }
    if let Some(unknown) = reason.keys().next() {
        return Err(invalid(format!(
            "unknown field reason.{unknown}: expected type, data"
        )));
    }
    Ok(ReasonEvent { event_type, data })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(body: &str) -> &'static str {
        parse(body.as_bytes(), 64).expect_err("refused").code
    }

    #[test]
    fn a_body_names_the_user_and_optionally_a_reason_and_a_revocation() {
        let plain = parse(br#"{"user":"alice"}"#, 64).expect("valid");
        assert_eq!(plain.user, Target::user("alice").expect("valid"));
        assert_eq!((plain.reason, plain.revoke), (None, false));

        let full = parse(
            br#"{"user":"a.b","revoke":true,"reason":{"type":"logged-out","data":{"by":"admin"}}}"#,
            64,
        )
        .expect("valid");
        assert!(full.revoke);
        assert_eq!(
            full.reason,
            Some(ReasonEvent {
                event_type: "logged-out".into(),
                data: r#"{"by":"admin"}"#.into(),
            })
        );
        let text = parse(
            br#"{"user":"a","reason":{"type":"bye","data":"see\nyou"}}"#,
            64,
        )
        .expect("valid");
        assert_eq!(text.reason.expect("reason").data, "see\nyou");
        let no_data = parse(br#"{"user":"a","reason":{"type":"bye"}}"#, 64).expect("valid");
        assert_eq!(no_data.reason.expect("reason").data, "null");
    }

    #[test]
    fn bad_bodies_are_refused_with_a_code_naming_the_field() {
        assert_eq!(code("not json"), "invalid_json");
        assert_eq!(code("[1]"), "invalid_json");
        assert_eq!(code("{}"), "invalid_user");
        assert_eq!(code(r#"{"user":42}"#), "invalid_user");
        assert_eq!(code(r#"{"user":""}"#), "invalid_user");
        assert_eq!(code(r#"{"user":"a\u0000b"}"#), "invalid_user");
        assert_eq!(code(r#"{"user":"a\r\nb"}"#), "invalid_user");
        assert_eq!(code(r#"{"user":"a","revoke":"yes"}"#), "invalid_revoke");
        assert_eq!(code(r#"{"user":"a","reason":"bye"}"#), "invalid_reason");
        assert_eq!(code(r#"{"user":"a","reason":{}}"#), "invalid_reason");
        assert_eq!(
            code(r#"{"user":"a","reason":{"type":"herald.reset"}}"#),
            "invalid_reason"
        );
        assert_eq!(
            code(r#"{"user":"a","reason":{"type":"a\r\ndata: x"}}"#),
            "invalid_reason"
        );
        assert_eq!(
            code(r#"{"user":"a","reason":{"type":"bye","extra":1}}"#),
            "invalid_reason"
        );
        let long = format!(
            r#"{{"user":"a","reason":{{"type":"bye","data":"{}"}}}}"#,
            "x".repeat(65)
        );
        assert_eq!(code(&long), "invalid_reason");
        assert_eq!(code(r#"{"user":"a","topic":"b"}"#), "unknown_field");
    }
}
