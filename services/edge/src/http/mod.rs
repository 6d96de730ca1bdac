//! The HTTP face of a node: the warp filter tree and shared request state.
//!
//! - [`routes`]: the public endpoints (streams, publish, presence), and
//!   [`admin_routes`]: the operators' (`/healthz`, `/readyz`, `/v1/cluster`,
//!   `/metrics`), served on a listener of their own; each with
//!   [`errors::recover`] turning failures into JSON errors ([`errors`]: the
//!   one place an error becomes a response);
//! - [`stream`]: `GET /v1/stream`, one SSE stream per client (opening it in
//!   `stream.rs`; its `session` and `cursor` below it);
//! - [`credentials`]: where a request's token is read from (header, query,
//!   cookie), and the publisher check every publisher endpoint runs;
//! - [`publish`]: `POST /v1/publish` (its `data` read by [`event_data`]);
//! - [`disconnect`]: `POST /v1/disconnect` (end a user's streams everywhere,
//!   optionally revoking their tokens);
//! - [`idempotency`]: `msg_id` dedup keys scoped to publisher and target;
//! - [`health`]: `/healthz`, `/readyz`, `/v1/cluster`, `/metrics` (admin
//!   listener) and `/v1/presence` (public);
//! - [`throttle`]: per-credential publish rate limits;
//! - [`rare_wake`]: a stream's rare waits polled only when they wake;
//! - [`server`]: the hyper accept loop (header timeouts, size limits, killing a
//!   slow client's socket, graceful shutdown);
//! - [`direct`]: a stream request read off the socket by the accept loop and
//!   its body written straight to the socket, without hyper's buffers.
//!
//! [`AppState`] is what every handler shares; its fields are the node's parts.

mod credentials;
mod direct;
mod disconnect;
pub(crate) mod errors;
mod event_data;
mod health;
mod idempotency;
mod publish;
mod rare_wake;
pub(crate) mod server;
pub(crate) mod stream;
pub(crate) mod throttle;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use herald_config::Settings;
use tokio_util::sync::CancellationToken;
use warp::Filter;
use warp::filters::BoxedFilter;

use crate::auth::Authenticator;
use crate::bus::Bus;
use crate::metrics::Metrics;
use crate::registry::{Kill, Registry};

/// What every request handler shares.
#[derive(Debug)]
pub(crate) struct AppState {
    /// This node's id.
    pub(crate) node_id: String,
    /// The validated settings.
    pub(crate) settings: Settings,
    /// Open connections by target.
    pub(crate) registry: Arc<Registry>,
    /// The event bus.
    pub(crate) bus: Arc<dyn Bus>,
    /// Token validation.
    pub(crate) auth: Authenticator,
    /// Prometheus metrics.
    pub(crate) metrics: Arc<Metrics>,
    /// Gossip membership.
    pub(crate) cluster: Arc<crate::cluster::Cluster>,
    /// Cluster-wide presence over NATS request/reply.
    pub(crate) presence: crate::cluster::presence::Presence,
    /// Cluster-wide disconnects and the revoked tokens.
    pub(crate) disconnects: crate::cluster::disconnect::Disconnects,
    /// Cancelled when the node starts draining: every stream then ends at a
    /// random moment within `stream.drain_ms`.
    pub(crate) drain: CancellationToken,
    /// Cancelled when the node stops serving; every stream still open ends.
    pub(crate) shutdown: CancellationToken,
    /// Set when the node stops taking new streams.
    pub(crate) draining: AtomicBool,
    /// Publish rate limits per credential.
    pub(crate) throttle: throttle::Throttle,
    /// Which deliveries are traced.
    pub(crate) tracing: Arc<crate::telemetry::Tracing>,
}

impl AppState {
    /// Whether the node refuses new streams.
    pub(crate) fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed) || self.shutdown.is_cancelled()
    }

    /// A `retry:` value with per-call jitter, so clients spread their reconnects.
    pub(crate) fn retry_hint_ms(&self) -> u64 {
        let stream = &self.settings.stream;
        stream.retry_ms + fastrand::u64(0..=stream.retry_jitter_ms)
    }

    /// Records one event about to be written: latency histogram and, when
    /// sampled, its delivery span.
    fn delivered(
        &self,
        event: &crate::bus::Event,
        connection: u64,
        user: &herald_protocol::Target,
        replayed: bool,
        queued: std::time::Duration,
    ) {
        if let Ok(latency) = std::time::SystemTime::now().duration_since(event.published_at) {
            self.metrics.delivery_latency.observe(latency.as_secs_f64());
        }
        self.tracing.delivered(crate::telemetry::Delivery {
            event,
            connection,
            user,
            replayed,
            queued,
        });
    }

    /// Counts bytes (and events) about to be written to a stream.
    fn written(&self, bytes: Bytes, events: u64) -> Bytes {
        self.metrics.bytes_written.inc_by(bytes.len() as u64);
        self.metrics.events_delivered.inc_by(events);
        bytes
    }
}

/// The public filter tree (`http.listen`): streams, publish and presence,
/// CORS when origins are configured, and one recovery turning every failure
/// into a JSON error. Operators' paths are not here: they answer 404.
pub(crate) fn routes(state: Arc<AppState>) -> BoxedFilter<(warp::reply::Response,)> {
    let origins = &state.settings.http.cors_allowed_origins;
    let endpoints = endpoints(Arc::clone(&state));
    let endpoints = if origins.is_empty() {
        endpoints
    } else {
        let cors = warp::cors()
            .allow_methods(["GET", "POST"])
            .allow_headers([
                "authorization",
                "content-type",
                "last-event-id",
                "cache-control",
            ])
            .allow_credentials(true)
            .max_age(600);
        let cors = if origins.iter().any(|o| o == "*") {
            cors.allow_any_origin()
        } else {
            cors.allow_origins(origins.iter().map(String::as_str))
        };
        endpoints.with(cors).map(warp::Reply::into_response).boxed()
    };
    endpoints.recover(errors::recover).unify().boxed()
}

/// The admin filter tree (`admin.listen`): `/healthz`, `/readyz`,
/// `/v1/cluster` and `/metrics`, with the same recovery (no CORS: browsers
/// have no business here).
pub(crate) fn admin_routes(state: Arc<AppState>) -> BoxedFilter<(warp::reply::Response,)> {
    let with_state = warp::any().map(move || Arc::clone(&state));
    let healthz = warp::path!("healthz").and(warp::get()).map(health::alive);
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with_state.clone())
        .map(health::ready);
    let cluster = warp::path!("v1" / "cluster")
        .and(warp::get())
        .and(with_state.clone())
        .map(health::cluster);
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_state)
        .map(health::metrics);
    healthz
        .or(readyz)
        .unify()
        .or(cluster)
        .unify()
        .or(metrics)
        .unify()
        .recover(errors::recover)
        .unify()
        .boxed()
}

/// Every public endpoint, failures still as rejections.
fn endpoints(state: Arc<AppState>) -> BoxedFilter<(warp::reply::Response,)> {
    let with_state = {
        let state = Arc::clone(&state);
        warp::any().map(move || Arc::clone(&state))
    };
    let raw_query = warp::query::raw().or(warp::any().map(String::new)).unify();

    let stream = warp::path!("v1" / "stream")
        .and(warp::get())
        .and(with_state.clone())
        .and(warp::header::headers_cloned())
        .and(raw_query)
        .and(warp::ext::optional::<Kill>())
        .and_then(stream::open);
    let publish = warp::path!("v1" / "publish")
        .and(warp::post())
        .and(with_state.clone())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and_then(|state, headers, body| publish::publish(state, headers, Box::pin(body)));
    let disconnect = warp::path!("v1" / "disconnect")
        .and(warp::post())
        .and(with_state.clone())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .and_then(|state, headers, body| disconnect::disconnect(state, headers, Box::pin(body)));
    let presence = warp::path!("v1" / "presence" / String)
        .and(warp::get())
        .and(with_state.clone())
        .and(warp::header::headers_cloned())
        .and_then(health::presence);

    stream
        .or(publish)
        .unify()
        .or(disconnect)
        .unify()
        .or(presence)
        .unify()
        .boxed()
}
