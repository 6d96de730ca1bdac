//! Gossip membership: every node's view of its peers.
//!
//! Delivery never depends on this module (NATS carries the events); it makes
//! the cluster operable: `GET /v1/cluster`, the `left`/draining announcement
//! on shutdown, and the load figures that [`rebalance`] acts on.
//!
//! Built on `chitchat` (scuttlebutt anti-entropy with a phi-accrual failure
//! detector, per-node versioned key/value state); nothing outside this module
//! names it, so a change of crate or of its pre-1.0 API stays here.
//! docs/architecture.md explains the choice and the timers.
//!
//! - [`Cluster::start`] binds the UDP socket and joins through the seeds;
//!   with a gossip key every datagram is sealed ([`transport`], [`seal`]);
//! - [`Cluster::run`] refreshes the view every gossip interval and gossips this
//!   node's load (at most every `gossip.state_update_ms`, only when changed);
//! - [`Cluster::leave`] announces the departure at once (SIGTERM);
//! - [`Cluster::stop`] ends the gossip task.
//!
//! Beside gossip, two cluster-wide services ride on NATS: [`presence`] (which
//! nodes hold a user's streams) and [`disconnect`] (ending a user's streams on
//! every node, and keeping revoked tokens out).

pub(crate) mod disconnect;
mod member;
pub(crate) mod presence;
pub(crate) mod rebalance;
mod seal;
mod transport;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chitchat::transport::{Transport, UdpTransport};
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, Heartbeat, ProtocolVersion,
    spawn_chitchat,
};
use herald_config::{GossipKeyError, GossipSettings, Settings};
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, StateLabel};

pub use member::{ClusterView, Member, MemberState, NodeInfo};

/// Why gossip could not start. Nothing is left running when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// `gossip.listen` is not a socket address.
    #[error("gossip.listen: {listen:?} is not an address ({source})")]
    ListenAddress {
        /// The configured value.
        listen: String,
        /// The parser's complaint.
        #[source]
        source: std::net::AddrParseError,
    },
    /// `gossip.listen` has port 0 and no free port could be found on its host.
    #[error("gossip.listen: cannot bind {addr}: {source}")]
    ListenProbe {
        /// The address probed.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `gossip.advertise` could not be resolved.
    #[error("gossip.advertise: cannot resolve {advertise:?}: {source}")]
    AdvertiseLookup {
        /// The configured value.
        advertise: String,
        /// The resolver's error.
        #[source]
        source: std::io::Error,
    },
    /// `gossip.advertise` resolved to no address at all.
    #[error("gossip.advertise: {advertise:?} resolves to no address")]
    AdvertiseUnresolved {
        /// The configured value.
        advertise: String,
    },
    /// The port probed for `gossip.listen` could not be read back.
    #[error("gossip: {0}")]
    ProbePort(#[source] std::io::Error),
    /// The gossip socket could not be opened (chitchat reports its errors as
    /// `anyhow::Error`; the message shows its whole chain of causes).
    #[error("gossip: {0:#}")]
    Start(#[source] anyhow::Error),
    /// `gossip.secret` / `gossip.secret_file` could not be read or decoded;
    /// nothing was bound.
    #[error("gossip key: {0}")]
    Keys(#[source] GossipKeyError),
    /// Gossip would listen beyond loopback without a key (configuration
    /// validation refuses this first); nothing was bound.
    #[error("gossip.listen {listen} is reachable from other hosts and no gossip key is set")]
    KeyRequired {
        /// `gossip.listen`.
        listen: SocketAddr,
    },
}

/// This node's load, as gossiped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LocalLoad {
    /// Open SSE streams.
    pub(crate) connections: u64,
    /// Users held.
    pub(crate) users: u64,
    /// `/readyz` would answer 200.
    pub(crate) ready: bool,
    /// Refusing new streams.
    pub(crate) draining: bool,
}

/// Chitchat's configuration for this node: `id` gossiping on `listen`, with
/// the settings' interval, seeds and failure detector.
fn chitchat_config(
    settings: &GossipSettings,
    id: ChitchatId,
    listen: SocketAddr,
) -> ChitchatConfig {
    let interval = Duration::from_millis(settings.interval_ms);
    let forget_after = Duration::from_secs(settings.forget_after_secs);
    ChitchatConfig {
        chitchat_id: id,
        cluster_id: settings.cluster_id.clone(),
        gossip_interval: interval,
        listen_addr: listen,
        seed_nodes: settings.seeds.clone(),
        failure_detector_config: FailureDetectorConfig {
            phi_threshold: settings.phi_threshold,
            sampling_window_size: 1_000,
            max_interval: Duration::from_secs(10),
            initial_interval: interval,
            dead_node_grace_period: forget_after,
        },
        marked_for_deletion_grace_period: forget_after,
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V0,
    }
}

/// The membership of one node.
pub(crate) struct Cluster {
    cluster_id: String,
    node_id: String,
    settings: GossipSettings,
    /// This node's own state (load fields updated by [`Cluster::run`]).
    info: RwLock<NodeInfo>,
    gossip: Option<Gossip>,
    view: RwLock<Arc<ClusterView>>,
    metrics: Arc<Metrics>,
    /// Set when the gossip task ended without being asked to.
    failed: CancellationToken,
    /// Set by [`Cluster::stop`], so the end it asks for is not a failure.
    stopping: Arc<AtomicBool>,
    /// When [`Cluster::leave`] announced the departure.
    left_at: std::sync::Mutex<Option<Instant>>,
}

struct Gossip {
    handle: tokio::sync::Mutex<Option<ChitchatHandle>>,
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    id: ChitchatId,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("cluster_id", &self.cluster_id)
            .field("node_id", &self.node_id)
            .field(
                "gossip",
                &self.gossip.as_ref().map(|g| g.id.gossip_advertise_addr),
            )
            .finish()
    }
}

impl Cluster {
    /// Joins the cluster (or, with `gossip.enabled = false`, runs alone
    /// without a socket). `http_addr` is the bound HTTP listener, for the
    /// default `node.http_advertise`.
    pub(crate) async fn start(
        settings: &Settings,
        node_id: &str,
        http_addr: SocketAddr,
        metrics: Arc<Metrics>,
    ) -> Result<Cluster, ClusterError> {
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut info = NodeInfo {
            http: String::new(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            started_at_ms: started.as_millis() as u64,
            ..NodeInfo::default()
        };
        let mut cluster = Cluster::new(settings.gossip.clone(), node_id, metrics);
        if !cluster.settings.enabled {
            info.http = settings
                .node
                .http_advertise
                .clone()
                .unwrap_or_else(|| format!("http://{http_addr}"));
            *write(&cluster.info) = info;
            tracing::info!("gossip disabled (gossip.enabled = false): this node runs alone");
            cluster.refresh_alone();
            return Ok(cluster);
        }

        let listen = listen_addr(&cluster.settings.listen)?;
        let advertise = advertise_addr(&cluster.settings, listen).await?;
        info.http = settings
            .node
            .http_advertise
            .clone()
            .unwrap_or_else(|| format!("http://{}:{}", advertise.ip(), http_addr.port()));
        wait_for_seeds(&cluster.settings).await;

        let id = ChitchatId::new(node_id, started.as_micros() as u64, advertise);
        let config = chitchat_config(&cluster.settings, id.clone(), listen);
        let transport = gossip_transport(&cluster.settings, listen, &cluster.metrics)?;
        let handle = spawn_chitchat(config, info.to_key_values(), transport.as_ref())
            .await
            .map_err(ClusterError::Start)?;
        let chitchat = handle.chitchat();
        cluster.watch_gossip_task(handle.termination_watcher());
        if cluster.settings.seeds.is_empty() {
            tracing::warn!(
                gossip = %advertise,
                "gossip.seeds is empty: this node runs alone until another node seeds to it"
            );
        }
        tracing::info!(
            cluster_id = %cluster.cluster_id,
            listen = %listen,
            advertise = %advertise,
            http = %info.http,
            seeds = ?cluster.settings.seeds,
            "gossip membership started"
        );
        *write(&cluster.info) = info;
        cluster.gossip = Some(Gossip {
            handle: tokio::sync::Mutex::new(Some(handle)),
            chitchat,
            id,
        });
        cluster.refresh_alone();
        Ok(cluster)
    }

    /// A membership of this node alone, not gossiping yet.
    fn new(settings: GossipSettings, node_id: &str, metrics: Arc<Metrics>) -> Cluster {
        Cluster {
            cluster_id: settings.cluster_id.clone(),
            node_id: node_id.to_string(),
            info: RwLock::new(NodeInfo::default()),
            gossip: None,
            view: RwLock::new(Arc::new(ClusterView::new(
                &settings.cluster_id,
                node_id,
                false,
                Vec::new(),
                Duration::ZERO,
            ))),
            settings,
            metrics,
            failed: CancellationToken::new(),
            stopping: Arc::new(AtomicBool::new(false)),
            left_at: std::sync::Mutex::new(None),
        }
    }

    /// Sets [`Cluster::failed`] when the gossip task ends without
    /// [`Cluster::stop`] having asked it to.
    fn watch_gossip_task(
        &self,
        termination: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) {
        let failed = self.failed.clone();
        let stopping = Arc::clone(&self.stopping);
        tokio::spawn(async move {
            let outcome = termination.await;
            if stopping.load(Ordering::Acquire) {
                return;
            }
            match outcome {
                Err(err) => tracing::error!(error = %err, "gossip task failed"),
                Ok(()) => tracing::error!("gossip task ended unexpectedly"),
            }
            failed.cancel();
        });
    }

    /// The cluster as this node currently sees it.
    pub(crate) fn view(&self) -> Arc<ClusterView> {
        Arc::clone(&self.view.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// This node's gossip address (`None` with gossip disabled).
    pub(crate) fn gossip_addr(&self) -> Option<SocketAddr> {
        self.gossip.as_ref().map(|g| g.id.gossip_advertise_addr)
    }

    /// Resolves if the gossip task ends on its own (a fatal condition).
    pub(crate) async fn failed(&self) {
        if self.gossip.is_some() {
            self.failed.cancelled().await
        } else {
            std::future::pending().await
        }
    }

    /// Refreshes the view every gossip interval and gossips `load()` when it
    /// changed (at most every `gossip.state_update_ms`), until `shutdown`.
    pub(crate) async fn run(&self, load: impl Fn() -> LocalLoad, shutdown: CancellationToken) {
        let Some(gossip) = &self.gossip else {
            self.update_self(load());
            self.refresh_alone();
            return;
        };
        let interval = Duration::from_millis(self.settings.interval_ms.min(100));
        let state_every = Duration::from_millis(self.settings.state_update_ms);
        let mut last_state = Instant::now() - state_every;
        let mut heard: HashMap<ChitchatId, (Heartbeat, Instant)> = HashMap::new();
        loop {
            if last_state.elapsed() >= state_every {
                last_state = Instant::now();
                if self.update_self(load()) {
                    self.publish_self(gossip).await;
                }
            }
            self.refresh(gossip, &mut heard).await;
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.failed.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// Announces that this node is leaving (draining, not ready) and pushes
    /// that to every live peer at once instead of waiting for a gossip round.
    pub(crate) async fn leave(&self) {
        {
            let mut info = write(&self.info);
            info.left = true;
            info.draining = true;
            info.ready = false;
        }
        let Some(gossip) = &self.gossip else {
            return;
        };
        *self.left_at.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.publish_self(gossip).await;
        let peers = self.push_to_live_peers(gossip).await;
        tracing::info!(peers, "announced departure to the cluster");
    }

    /// Starts a gossip exchange with every live peer now (instead of at the
    /// next round); returns how many were contacted.
    async fn push_to_live_peers(&self, gossip: &Gossip) -> usize {
        let peers: Vec<SocketAddr> = {
            let chitchat = gossip.chitchat.lock().await;
            chitchat
                .live_nodes()
                .filter(|id| **id != gossip.id)
                .map(|id| id.gossip_advertise_addr)
                .collect()
        };
        if let Some(handle) = gossip.handle.lock().await.as_ref() {
            for peer in &peers {
                if let Err(err) = handle.gossip(*peer) {
                    tracing::debug!(%peer, error = %err, "could not push the departure");
                }
            }
        }
        peers.len()
    }

    /// Ends gossip (after the drain, so peers saw the streams go). After a
    /// departure it first lingers for a few gossip rounds: a gossip exchange
    /// takes a round trip and a half, and a node that vanished mid-exchange
    /// would be seen as failed instead of `left`.
    pub(crate) async fn stop(&self) {
        let Some(gossip) = &self.gossip else {
            return;
        };
        let left_at = *self.left_at.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(left_at) = left_at {
            self.push_to_live_peers(gossip).await;
            let linger = Duration::from_millis(self.settings.interval_ms * 3)
                .max(Duration::from_millis(500));
            tokio::time::sleep_until((left_at + linger).into()).await;
        }
        let Some(handle) = gossip.handle.lock().await.take() else {
            return;
        };
        self.stopping.store(true, Ordering::Release);
        if let Err(err) = handle.shutdown().await {
            tracing::warn!(error = %err, "gossip task did not stop cleanly");
        }
    }

    /// Records `load` in this node's state; returns whether anything changed.
    fn update_self(&self, load: LocalLoad) -> bool {
        let mut info = write(&self.info);
        let before = info.clone();
        info.connections = load.connections;
        info.users = load.users;
        if !info.left {
            info.ready = load.ready;
            info.draining = load.draining;
        }
        *info != before
    }

    async fn publish_self(&self, gossip: &Gossip) {
        let pairs = read(&self.info).to_key_values();
        let mut chitchat = gossip.chitchat.lock().await;
        let state = chitchat.self_node_state();
        for (key, value) in pairs {
            if state.get(&key) != Some(value.as_str()) {
                state.set(key, value);
            }
        }
    }

    async fn refresh(
        &self,
        gossip: &Gossip,
        heard: &mut HashMap<ChitchatId, (Heartbeat, Instant)>,
    ) {
        let now = Instant::now();
        let observations: Vec<member::Observation> = {
            let chitchat = gossip.chitchat.lock().await;
            let live: std::collections::HashSet<&ChitchatId> = chitchat.live_nodes().collect();
            chitchat
                .node_states()
                .iter()
                .map(|(id, state)| {
                    let beat = state.heartbeat();
                    let entry = heard.entry(id.clone()).or_insert((beat, now));
                    if entry.0 != beat {
                        *entry = (beat, now);
                    }
                    let is_self = *id == gossip.id;
                    member::Observation {
                        id: id.node_id.to_string(),
                        generation: id.generation_id,
                        gossip: id.gossip_advertise_addr,
                        info: if is_self {
                            read(&self.info).clone()
                        } else {
                            NodeInfo::from_key_values(state.key_values())
                        },
                        live: live.contains(id),
                        last_heard: if is_self {
                            Duration::ZERO
                        } else {
                            now.duration_since(entry.1)
                        },
                        is_self,
                    }
                })
                .collect()
        };
        heard.retain(|id, _| {
            observations
                .iter()
                .any(|o| o.id == *id.node_id && o.generation == id.generation_id)
        });
        let view = ClusterView::new(
            &self.cluster_id,
            &self.node_id,
            true,
            observations,
            Duration::from_millis(self.settings.dead_after_ms),
        );
        self.publish_view(view);
    }

    /// A view of this node alone: with gossip disabled, or before the first
    /// gossip round.
    fn refresh_alone(&self) {
        let info = read(&self.info).clone();
        let me = member::Observation {
            id: self.node_id.clone(),
            generation: self.gossip.as_ref().map_or(0, |g| g.id.generation_id),
            gossip: self
                .gossip_addr()
                .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)),
            info,
            live: true,
            last_heard: Duration::ZERO,
            is_self: true,
        };
        let view = ClusterView::new(
            &self.cluster_id,
            &self.node_id,
            self.gossip.is_some(),
            vec![me],
            Duration::ZERO,
        );
        self.publish_view(view);
    }

    fn publish_view(&self, view: ClusterView) {
        for state in MemberState::ALL {
            self.metrics
                .cluster_members
                .get_or_create(&StateLabel {
                    state: state.as_str(),
                })
                .set(view.count(state) as i64);
        }
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
    }
}

/// The sealed transport with the configured keys; plain UDP only when there
/// is no key and gossip listens on loopback (one-machine development and the
/// plain-versus-sealed benchmark).
fn gossip_transport(
    settings: &GossipSettings,
    listen: SocketAddr,
    metrics: &Arc<Metrics>,
) -> Result<Box<dyn Transport>, ClusterError> {
    let keys = settings.keys().map_err(ClusterError::Keys)?;
    match seal::Keyring::new(&keys) {
        Some(keys) => {
            tracing::info!(
                keys = keys.len(),
                replay_window_ms = settings.replay_window_ms,
                "gossip datagrams are sealed (XChaCha20-Poly1305)"
            );
            Ok(Box::new(transport::SealedTransport::new(
                keys,
                settings.replay_window_ms,
                Arc::clone(metrics),
            )))
        }
        None if listen.ip().is_loopback() => {
            tracing::warn!(
                listen = %listen,
                "gossip is NOT authenticated (no gossip.secret): acceptable on loopback only"
            );
            Ok(Box::new(UdpTransport))
        }
        None => Err(ClusterError::KeyRequired { listen }),
    }
}

fn read(lock: &RwLock<NodeInfo>) -> std::sync::RwLockReadGuard<'_, NodeInfo> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write(lock: &RwLock<NodeInfo>) -> std::sync::RwLockWriteGuard<'_, NodeInfo> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}

/// `gossip.listen`; port 0 becomes a free port (chitchat needs to know its
/// port before it binds, to advertise it).
fn listen_addr(listen: &str) -> Result<SocketAddr, ClusterError> {
    let mut addr: SocketAddr = listen
        .parse()
        .map_err(|source| ClusterError::ListenAddress {
            listen: listen.to_owned(),
            source,
        })?;
    if addr.port() == 0 {
        let probe = std::net::UdpSocket::bind(addr)
            .map_err(|source| ClusterError::ListenProbe { addr, source })?;
        let port = probe.local_addr().map_err(ClusterError::ProbePort)?.port();
        addr.set_port(port);
    }
    Ok(addr)
}

/// `gossip.advertise` resolved, or the listen address (loopback for an
/// unspecified one).
async fn advertise_addr(
    settings: &GossipSettings,
    listen: SocketAddr,
) -> Result<SocketAddr, ClusterError> {
    match &settings.advertise {
        Some(advertise) => {
            let resolved = tokio::net::lookup_host(advertise.as_str())
                .await
                .map_err(|source| ClusterError::AdvertiseLookup {
                    advertise: advertise.clone(),
                    source,
                })?
                .min_by_key(|addr| addr.is_ipv6());
            resolved.ok_or_else(|| ClusterError::AdvertiseUnresolved {
                advertise: advertise.clone(),
            })
        }
        None if listen.ip().is_unspecified() => {
            if !settings.seeds.is_empty() {
                tracing::warn!(
                    listen = %listen,
                    "gossip.advertise is not set and gossip.listen is a wildcard: advertising \
                     127.0.0.1, which peers on other hosts cannot reach"
                );
            }
            Ok(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                listen.port(),
            ))
        }
        None => Ok(listen),
    }
}

/// Seeds given as DNS names may resolve to nothing while the pods behind them
/// start; retry for `gossip.seed_resolve_timeout_ms` before running alone
/// (they are re-resolved every 60 s after that anyway).
async fn wait_for_seeds(settings: &GossipSettings) {
    let names: Vec<&String> = settings
        .seeds
        .iter()
        .filter(|seed| seed.parse::<SocketAddr>().is_err())
        .collect();
    if names.is_empty() {
        return;
    }
    let deadline = Instant::now() + Duration::from_millis(settings.seed_resolve_timeout_ms);
    loop {
        for name in &names {
            if let Ok(mut addrs) = tokio::net::lookup_host(name.as_str()).await {
                if addrs.next().is_some() {
                    return;
                }
            }
        }
        if Instant::now() >= deadline {
            tracing::warn!(seeds = ?names, "no gossip seed resolved yet; starting alone, retrying every 60 s");
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn an_unparsable_listen_address_names_the_key_and_keeps_the_parser_error_as_its_source() {
        let err = listen_addr("everywhere").expect_err("not an address");
        assert_eq!(
            err.to_string(),
            "gossip.listen: \"everywhere\" is not an address (invalid socket address syntax)"
        );
        assert!(err.source().is_some());
    }

    #[test]
    fn port_zero_becomes_a_free_port() {
        let addr = listen_addr("127.0.0.1:0").expect("a free port");
        assert_ne!(addr.port(), 0);
    }
}
