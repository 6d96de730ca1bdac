//! Herald edge node: holds browsers' SSE connections and streams each user
//! their events, in order, resuming from `Last-Event-ID`.
//!
//! Layout (read top-down; every module is private, the public surface is the
//! `pub use` list below):
//! - [`Node`] / [`run`] (this file): build the parts from [`Settings`], serve
//!   until the shutdown future resolves, then drain: end every stream cleanly;
//! - `http`: the warp filter trees (public: `/v1/stream`, `/v1/publish`,
//!   presence; admin: health, cluster view, metrics) and the one
//!   error-to-response mapping (`errors`); the stream (`stream`: opening,
//!   its `session`, its `cursor`); publishing,
//!   credentials, idempotency keys, rate limits; the hyper accept loop
//!   (`server`) and the socket writer of stream requests (`direct`);
//! - `registry`: the sharded map of live connections by target, with bounded
//!   per-connection queues and kill switches (`connection`);
//! - `bus`: the event bus trait (publish, follow, replay, head); `memory` (the
//!   embedded single-node bus) and `nats` (JetStream: `provision`, `store`,
//!   `decode`, `follow`, `chain`, `dispatcher`);
//! - `auth`: JWT validation for subscribers and publishers against one or
//!   more trusted issuers (`issuer`), their key sets kept fresh from JWKS
//!   files or identity providers over HTTPS (`key_set`, `provider`), token
//!   minting;
//! - `cluster`: gossip membership (the cluster view, the departure
//!   announcement), `rebalance` decisions, cluster-wide `presence`, and
//!   `disconnect` (ending a user's streams everywhere, token revocation);
//! - `metrics`: Prometheus metrics, each declared once;
//! - `telemetry`: the sampling decision and span of each delivery;
//! - `heap`: live heap bytes for `/metrics` (with `--features heap-stats`).

// Inside the crate, `pub(crate)` is the widest visibility: a `pub` item must be
// reachable from the list below.
#![warn(unreachable_pub)]

mod auth;
mod bus;
mod cluster;
mod heap;
mod http;
mod metrics;
mod registry;
mod telemetry;

pub use auth::{Claims, KeyError, PublishClaim, check_keys, expiry_in, mint, now_secs};
pub use bus::nats::NatsError;
pub use cluster::disconnect::RevocationError;
pub use cluster::{ClusterError, ClusterView, Member, MemberState, NodeInfo};
pub use http::errors::ApiError;
pub use http::stream::StreamRequest;

/// The `http` crate types in Herald's public API (request headers), re-exported
/// for fuzz targets and tools.
pub use warp::http as warp_http;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use herald_config::{BusKind, Settings};
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;

use crate::auth::Authenticator;
use crate::bus::Bus;
use crate::bus::memory::MemoryBus;
use crate::bus::nats::NatsBus;
use crate::http::AppState;
use crate::http::server::ServerLimits;
use crate::metrics::Metrics;
use crate::registry::{Registry, RegistryLimits};

/// Why a node could not start. Nothing is left running when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configured token keys could not be loaded (a key file missing or
    /// not a key); validation checks only that the files exist.
    #[error("invalid configuration: {0}")]
    Config(#[from] auth::KeyError),
    /// The event bus could not be set up.
    #[error("event bus: {0}")]
    Bus(#[from] bus::nats::NatsError),
    /// Gossip membership could not start.
    #[error("{0}")]
    Gossip(#[from] cluster::ClusterError),
    /// Cluster-wide disconnects could not be set up (NATS bus: the order
    /// subscription or the revocation bucket).
    #[error("{0}")]
    Revocations(#[from] cluster::disconnect::RevocationError),
    /// The gossip task ended while the node ran (the node drained and stopped).
    #[error("gossip membership stopped unexpectedly")]
    GossipStopped,
    /// A listener (public or admin) could not be bound.
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        /// The setting naming the address: `http.listen` or `admin.listen`.
        key: &'static str,
        /// The configured address.
        addr: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A bound, not yet running, edge node.
#[derive(Debug)]
pub struct Node {
    listener: TcpListener,
    local_addr: SocketAddr,
    /// The admin listener (`admin.listen`): metrics, cluster view, probes.
    admin_listener: TcpListener,
    admin_addr: SocketAddr,
    state: Arc<AppState>,
    /// The disconnect orders and the revocation bucket, subscribed to at
    /// bind, followed while running.
    disconnect_subscriptions: cluster::disconnect::Subscriptions,
}

/// A view of a running node, for tests and tools in the same process.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    state: Arc<AppState>,
}

impl NodeHandle {
    /// Open SSE streams.
    pub fn connections(&self) -> usize {
        self.state.registry.connection_count()
    }

    /// Targets (users and topics) with at least one open stream here.
    pub fn targets(&self) -> usize {
        self.state.registry.target_count()
    }

    /// The metrics in Prometheus text form.
    pub fn metrics_text(&self) -> String {
        self.state.metrics.render()
    }

    /// The cluster as this node sees it.
    pub fn cluster(&self) -> Arc<cluster::ClusterView> {
        self.state.cluster.view()
    }

    /// This node's gossip address (`None` with gossip disabled).
    pub fn gossip_addr(&self) -> Option<SocketAddr> {
        self.state.cluster.gossip_addr()
    }
}

impl Node {
    /// Builds every part from `settings` and binds the HTTP listener.
    pub async fn bind(settings: Settings) -> Result<Node, StartError> {
        let node_id = settings.node.resolved_id();
        let metrics = Arc::new(Metrics::default());
        let auth = Authenticator::new(&settings.auth, &metrics)?;
        // Bounded: a provider that is down does not keep the node from
        // starting; it serves unready (`/readyz` says why) until keys arrive.
        auth.wait_for_keys(Duration::from_secs(settings.auth.jwks_start_wait_secs))
            .await;
        let registry = Arc::new(Registry::new(
            RegistryLimits {
                max_connections: settings.stream.max_connections,
                max_connections_per_user: settings.stream.max_connections_per_user,
            },
            Arc::clone(&metrics),
        ));
        let tracing = Arc::new(telemetry::Tracing::new(&settings, &node_id));
        let (bus, nats_client) =
            start_bus(&settings, &node_id, &registry, &metrics, &tracing).await?;
        let (disconnects, disconnect_subscriptions) =
            cluster::disconnect::Disconnects::start(cluster::disconnect::DisconnectParts {
                settings: &settings,
                client: nats_client.clone(),
                registry: Arc::clone(&registry),
                metrics: Arc::clone(&metrics),
                tracing: Arc::clone(&tracing),
            })
            .await?;
        let backlog = settings.http.listen_backlog;
        let (listener, local_addr) = bind("http.listen", &settings.http.listen, backlog)?;
        let (admin_listener, admin_addr) = bind("admin.listen", &settings.admin.listen, backlog)?;
        let cluster = Arc::new(
            cluster::Cluster::start(&settings, &node_id, local_addr, Arc::clone(&metrics)).await?,
        );
        let presence = cluster::presence::Presence::new(
            nats_client,
            &settings.nats.live_prefix,
            &node_id,
            Arc::clone(&registry),
            Duration::from_millis(settings.nats.presence_timeout_ms),
        );
        let throttle = http::throttle::Throttle::new(settings.http.publish_rate_per_sec);
        let state = Arc::new(AppState {
            tracing,
            node_id,
            throttle,
            settings,
            registry,
            bus,
            auth,
            metrics,
            cluster,
            presence,
            disconnects,
            drain: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            draining: AtomicBool::new(false),
        });
        Ok(Node {
            listener,
            local_addr,
            admin_listener,
            admin_addr,
            state,
            disconnect_subscriptions,
        })
    }

    /// The address the node listens on (the real port when configured with 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the admin listener (`/metrics`, `/v1/cluster`,
    /// `/healthz`, `/readyz`; the real port when configured with 0).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// A view of the node that stays valid while it runs.
    pub fn handle(&self) -> NodeHandle {
        NodeHandle {
            state: Arc::clone(&self.state),
        }
    }

    /// Serves until `shutdown` resolves, then drains: `/readyz` fails and new
    /// streams are told to retry, open streams end (each with a `retry:` hint,
    /// so its client reconnects elsewhere) at random moments spread over
    /// `stream.drain_ms`, then the listener closes and open requests get up to
    /// `http.shutdown_grace_ms`. The admin listener keeps answering while the
    /// node drains (`/readyz` then says 503) and closes with the public one.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
        let state = self.state;
        let http = &state.settings.http;
        let limits = ServerLimits {
            header_read_timeout: Duration::from_millis(http.header_read_timeout_ms),
            max_header_bytes: http.max_header_bytes,
            shutdown_grace: Duration::from_millis(http.shutdown_grace_ms),
        };
        tracing::info!(
            node = %state.node_id,
            addr = %self.local_addr,
            admin = %self.admin_addr,
            bus = state.bus.kind(),
            "herald edge node listening"
        );
        for keys in state.auth.key_sets() {
            tokio::spawn(Arc::clone(keys).keep_fresh(state.shutdown.clone()));
        }
        let server = tokio::spawn(http::server::serve(
            self.listener,
            http::routes(Arc::clone(&state)),
            limits,
            state.shutdown.clone(),
        ));
        let admin = tokio::spawn(http::server::serve(
            self.admin_listener,
            http::admin_routes(Arc::clone(&state)),
            limits,
            state.shutdown.clone(),
        ));
        let membership = tokio::spawn(gossip_load(Arc::clone(&state)));
        tokio::spawn(state.presence.clone().serve(state.shutdown.clone()));
        tokio::spawn(
            state
                .disconnects
                .clone()
                .serve(self.disconnect_subscriptions, state.shutdown.clone()),
        );
        // Moving a stream to another node only makes sense when every node
        // reads the same history (NATS), not one memory bus per process.
        if state.settings.bus.kind == BusKind::Nats {
            tokio::spawn(cluster::rebalance::run(
                Arc::clone(&state.cluster),
                Arc::clone(&state.registry),
                Arc::clone(&state.metrics),
                state.settings.rebalance.clone(),
                state.drain.clone(),
            ));
        }

        let outcome = tokio::select! {
            _ = shutdown => Ok(()),
            _ = state.cluster.failed() => Err(StartError::GossipStopped),
        };
        drain(&state).await;
        state.shutdown.cancel();
        let _ = membership.await;
        state.cluster.stop().await;
        for (listener, task) in [("http", server), ("admin", admin)] {
            if let Err(err) = task.await {
                tracing::error!(error = %err, listener, "http server task failed");
            }
        }
        tracing::info!("herald edge node stopped");
        outcome
    }
}

/// Binds the listener `key` configures at `addr` (an IP address and port, as
/// validated) with room for `backlog` connections not yet accepted; returns it
/// with the address it got (the real port for port 0).
fn bind(
    key: &'static str,
    addr: &str,
    backlog: u32,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let failed = |source| StartError::Bind {
        key,
        addr: addr.to_owned(),
        source,
    };
    let parsed: SocketAddr = addr
        .parse()
        .map_err(|err| failed(std::io::Error::new(std::io::ErrorKind::InvalidInput, err)))?;
    let socket = match parsed {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(failed)?;
    // As `TcpListener::bind` does: a restarted node can take its port back
    // while the old connections are still in TIME_WAIT.
    socket.set_reuseaddr(true).map_err(failed)?;
    socket.bind(parsed).map_err(failed)?;
    let listener = socket.listen(backlog).map_err(failed)?;
    let local_addr = listener.local_addr().map_err(failed)?;
    Ok((listener, local_addr))
}

/// The configured event bus, delivering to `registry`, and for NATS the
/// client cluster presence shares.
async fn start_bus(
    settings: &Settings,
    node_id: &str,
    registry: &Arc<Registry>,
    metrics: &Arc<Metrics>,
    tracing: &Arc<telemetry::Tracing>,
) -> Result<(Arc<dyn Bus>, Option<async_nats::Client>), StartError> {
    match settings.bus.kind {
        BusKind::Memory => {
            tracing::warn!(
                "bus.kind = memory: embedded single-node bus, history kept in this process \
                 only and lost on restart. Use bus.kind = nats in production."
            );
            Ok((
                Arc::new(MemoryBus::new(&settings.memory, registry.clone())),
                None,
            ))
        }
        BusKind::Nats => {
            let wiring = crate::bus::nats::Wiring {
                sink: registry.clone(),
                metrics: Arc::clone(metrics),
                tracing: Arc::clone(tracing),
            };
            let bus = NatsBus::connect(&settings.nats, node_id, wiring).await?;
            let client = bus.client();
            Ok((Arc::new(bus), Some(client)))
        }
    }
}

/// Drain: announce the departure, fail `/readyz` and tell new streams to retry
/// elsewhere, end open streams at random moments over `stream.drain_ms` (each
/// with a `retry:` hint), and return when none is left or at the deadline.
async fn drain(state: &Arc<AppState>) {
    let drain_window = Duration::from_millis(state.settings.stream.drain_ms);
    state
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        connections = state.registry.connection_count(),
        drain_ms = drain_window.as_millis() as u64,
        "draining: not ready, closing streams over the drain window"
    );
    state.cluster.leave().await;
    state.drain.cancel();
    let deadline = tokio::time::Instant::now() + drain_window + Duration::from_millis(500);
    while state.registry.connection_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Gossips this node's load until the node stops serving (it keeps going
/// while the node drains, so peers see its streams go).
async fn gossip_load(state: Arc<AppState>) {
    let load = || cluster::LocalLoad {
        connections: state.registry.connection_count() as u64,
        users: state.registry.user_count() as u64,
        ready: state.bus.is_ready() && !state.is_draining() && state.auth.has_all_keys(),
        draining: state.is_draining(),
    };
    state.cluster.run(load, state.shutdown.clone()).await;
}

/// Binds and runs a node until `shutdown` resolves.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    Node::bind(settings).await?.run(shutdown).await
}
