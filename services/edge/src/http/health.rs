//! Liveness, readiness, cluster view and metrics endpoints for load balancers,
//! operators and Prometheus.

use std::sync::Arc;

use serde_json::json;
use warp::Reply;
use warp::http::StatusCode;
use warp::reply::Response;

use super::AppState;

/// `GET /healthz`: the process is up and serving HTTP.
pub fn alive() -> Response {
    warp::reply::json(&json!({"status": "ok"})).into_response()
}

/// `GET /readyz`: 200 when the node should receive new streams (bus connected,
/// not draining); 503 with the reasons otherwise.
pub fn ready(state: Arc<AppState>) -> Response {
    let mut reasons = Vec::new();
    if !state.bus.is_ready() {
        reasons.push("bus_unavailable");
    }
    if state.is_draining() {
        reasons.push("draining");
    }
    if reasons.is_empty() {
        warp::reply::json(&json!({"status": "ready"})).into_response()
    } else {
        warp::reply::with_status(
            warp::reply::json(&json!({"status": "unready", "reasons": reasons})),
            StatusCode::SERVICE_UNAVAILABLE,
        )
        .into_response()
    }
}

/// `GET /v1/cluster`: the members as this node sees them through gossip, with
/// cluster totals.
pub fn cluster(state: Arc<AppState>) -> Response {
    warp::reply::json(&*state.cluster.view()).into_response()
}

/// `GET /metrics`: Prometheus text format.
pub fn metrics(state: Arc<AppState>) -> Response {
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
