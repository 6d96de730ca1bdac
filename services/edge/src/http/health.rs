//! Liveness, readiness, cluster view and metrics endpoints for load balancers,
//! operators and Prometheus.

use std::sync::Arc;

use serde_json::json;
use warp::Reply;
use warp::http::StatusCode;
use warp::reply::Response;

use herald_protocol::Target;
use warp::Rejection;
use warp::http::HeaderMap;

use super::AppState;
use super::credentials::require_publisher;
use super::errors::ApiError;
use crate::cluster::MemberState;

/// `GET /healthz`: the process is up and serving HTTP.
pub(crate) fn alive() -> Response {
    warp::reply::json(&json!({"status": "ok"})).into_response()
}

/// `GET /readyz`: 200 when the node should receive new streams (bus connected,
/// every issuer's signing keys loaded, not draining); 503 with the reasons
/// otherwise, and for missing keys which issuer and why (`signing_keys`).
pub(crate) fn ready(state: Arc<AppState>) -> Response {
    let mut reasons = Vec::new();
    if !state.bus.is_ready() {
        reasons.push("bus_unavailable");
    }
    let missing_keys = state.auth.missing_keys();
    if !missing_keys.is_empty() {
        reasons.push("signing_keys_unavailable");
    }
    if state.is_draining() {
        reasons.push("draining");
    }
    if reasons.is_empty() {
        warp::reply::json(&json!({"status": "ready"})).into_response()
    } else {
        let mut body = json!({"status": "unready", "reasons": reasons});
        if !missing_keys.is_empty() {
            body["signing_keys"] = json!(missing_keys);
        }
        warp::reply::with_status(warp::reply::json(&body), StatusCode::SERVICE_UNAVAILABLE)
            .into_response()
    }
}

/// `GET /v1/cluster`: the members as this node sees them through gossip, with
/// cluster totals.
pub(crate) fn cluster(state: Arc<AppState>) -> Response {
    warp::reply::json(&*state.cluster.view()).into_response()
}

/// `GET /v1/presence/{user}` (publisher credential that may publish to the
/// user): which nodes hold streams of the user, asked over NATS.
pub(crate) async fn presence(
    raw_user: String,
    state: Arc<AppState>,
    headers: HeaderMap,
) -> Result<Response, Rejection> {
    let publisher = require_publisher(&state.auth, &headers).await?;
    let name = percent_encoding::percent_decode_str(&raw_user)
        .decode_utf8()
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_user",
                "the user id is not valid percent-encoded UTF-8",
            )
        })?;
    let user = Target::user(&name)
        .map_err(|err| ApiError::new(StatusCode::BAD_REQUEST, "invalid_user", err.to_string()))?;
    if !publisher.may_publish(&user) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this credential may not publish to this user, so it may not ask about them",
        )
        .into());
    }
    let view = state.cluster.view();
    let expected = view.gossip.then(|| {
        view.members
            .iter()
            .filter(|m| m.state == MemberState::Alive)
            .map(|m| m.id.clone())
            .collect()
    });
    let answer = state.presence.ask(&user, expected).await;
    Ok(warp::reply::json(&answer).into_response())
}

/// `GET /metrics`: Prometheus text format.
pub(crate) fn metrics(state: Arc<AppState>) -> Response {
    state
        .metrics
        .queued_events
        .set(state.registry.queued_events() as i64);
    let mut response = state.metrics.render().into_response();
    response.headers_mut().insert(
        "content-type",
        warp::http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
