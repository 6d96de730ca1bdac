//! The gossip socket: chitchat's UDP transport with every datagram sealed
//! ([`seal`](super::seal)) on the way out and opened on the way in.
//!
//! chitchat's transport seam (`chitchat::transport::{Transport, Socket}`)
//! works with decoded envelopes, and its envelope codec is private to the
//! crate. Its public `Serializable`/`Deserializable` traits cover the delta
//! but not the digest, so:
//!
//! - **`Ack` and `BadCluster`** (a delta, or nothing) are encoded and decoded
//!   here, in chitchat's exact wire format ([`wire`]): one system call per
//!   datagram, as chitchat's own socket makes;
//! - **`Syn` and `SynAck`** carry a digest, so rather than fork chitchat,
//!   [`SealedTransport`] keeps chitchat's own UDP socket as their codec,
//!   bound to a private loopback port, and puts itself between that socket
//!   and the network:
//!
//! ```text
//!  chitchat ──send(peer, envelope)──▶ codec socket ──bytes──▶ outbox ─seal─▶ network socket ──▶ peer
//!  chitchat ◀──(peer, envelope)──── codec socket ◀──bytes── inbox[peer] ◀─open─ network socket ◀── peer
//! ```
//!
//! - the **network socket** is bound to `gossip.listen`; only sealed
//!   datagrams enter or leave it;
//! - the **outbox** receives what chitchat encodes; it is connected to the
//!   codec socket, so the kernel delivers it nothing from anyone else;
//! - one **inbox** per peer hands that peer's opened datagrams to chitchat, so
//!   the address chitchat sees maps back to the real peer, exactly, whatever
//!   the order of arrival. A datagram reaching the codec socket from any other
//!   loopback address (another local process) is dropped.
//!
//! Costs: for a `Syn` or `SynAck`, two loopback hops in each direction (two
//! more system calls each, a few µs) and one socket per peer; a gossip round
//! is a `Syn`, a `SynAck` and an `Ack`, so two datagrams in three take the
//! hops. `docs/benchmarks.md` has the CPU measured.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use chitchat::ChitchatEnvelope;
use chitchat::transport::{RecvOutcome, SendOutcome, Socket, Transport, UdpSocket as CodecSocket};
use tokio::net::UdpSocket;

use super::seal::{Keyring, OVERHEAD, Opener, Rejection, Sealer};
use crate::metrics::{Metrics, ReasonLabel};

mod wire;

/// Largest UDP payload over IPv4; chitchat fills datagrams up to this.
const MAX_DATAGRAM: usize = 65_507;

/// Most peers with an inbox at once; the least recently heard is closed
/// beyond. Only peers whose datagrams opened get one.
const MAX_INBOXES: usize = 1_024;

/// How long to wait for chitchat's encoded datagram on the loopback hop.
/// Loopback delivery is immediate; this only bounds a kernel that dropped it
/// (a receive buffer smaller than a datagram), so gossip cannot stall.
const LOOPBACK_PATIENCE: Duration = Duration::from_secs(1);

/// At most one warning per this interval for rejected datagrams (each one is
/// counted in `herald_gossip_rejected_total` all the same).
const REJECTION_LOG_EVERY: Duration = Duration::from_secs(10);

/// Why the sealed gossip socket failed. At the chitchat seam these become
/// `anyhow` errors: a send error is logged by chitchat and the datagram lost,
/// a receive error stops gossip (and the node reports it as failed).
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    /// `gossip.listen` or a loopback socket could not be bound; nothing opened.
    #[error("cannot bind {what} {addr}/udp")]
    Bind {
        /// Which socket.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A socket failed outside of a transient condition; this datagram is
    /// lost (and on receive, the socket is broken).
    #[error("gossip {what} failed")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// chitchat's encoded datagram never arrived over loopback; it is lost.
    #[error("chitchat's datagram was lost on the loopback hop")]
    LoopbackLost,
    /// Sealed, the datagram would exceed the UDP limit; it was not sent. Only
    /// a cluster of about a thousand nodes fills a datagram this much.
    #[error(
        "sealed gossip datagram would be {bytes} bytes, over the {MAX_DATAGRAM}-byte UDP limit"
    )]
    TooLarge {
        /// Size after sealing.
        bytes: usize,
    },
    /// chitchat's codec socket failed.
    #[error("chitchat codec socket")]
    Codec(#[source] anyhow::Error),
}

/// chitchat transport sealing every datagram with the cluster's gossip keys.
pub(crate) struct SealedTransport {
    keys: Arc<Keyring>,
    window_ms: u64,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for SealedTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedTransport")
            .field("keys", &self.keys)
            .field("window_ms", &self.window_ms)
            .finish_non_exhaustive()
    }
}

impl SealedTransport {
    /// A transport sealing with `keys` and accepting timestamps within
    /// `window_ms` of this node's clock; rejections are counted in `metrics`.
    pub(crate) fn new(keys: Keyring, window_ms: u64, metrics: Arc<Metrics>) -> SealedTransport {
        for reason in Rejection::ALL {
            // Present at 0 from the start, so dashboards and alerts see them.
            drop(metrics.gossip_rejected.get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            }));
        }
        SealedTransport {
            keys: Arc::new(keys),
            window_ms,
            metrics,
        }
    }

    async fn open_socket(&self, listen_addr: SocketAddr) -> Result<SealedSocket, TransportError> {
        let network =
            UdpSocket::bind(listen_addr)
                .await
                .map_err(|source| TransportError::Bind {
                    what: "gossip socket",
                    addr: listen_addr,
                    source,
                })?;
        let codec = Codec::open().await?;
        Ok(SealedSocket {
            network,
            codec,
            keys: Arc::clone(&self.keys),
            sealer: Sealer::new(),
            opener: Opener::new(self.window_ms),
            rejections: RejectionLog {
                metrics: Arc::clone(&self.metrics),
                last_warned: None,
                suppressed: 0,
            },
            received: vec![0; MAX_DATAGRAM + 1].into_boxed_slice(),
            encoded: vec![0; MAX_DATAGRAM + 1].into_boxed_slice(),
            direct: Vec::new(),
            sealed: Vec::with_capacity(MAX_DATAGRAM),
        })
    }
}

#[async_trait]
impl Transport for SealedTransport {
    async fn open(&self, listen_addr: SocketAddr) -> anyhow::Result<Box<dyn Socket>> {
        Ok(Box::new(self.open_socket(listen_addr).await?))
    }
}

/// The socket chitchat gossips through.
struct SealedSocket {
    network: UdpSocket,
    codec: Codec,
    keys: Arc<Keyring>,
    sealer: Sealer,
    opener: Opener,
    rejections: RejectionLog,
    /// Datagrams from the network (opened in place).
    received: Box<[u8]>,
    /// chitchat's encoded output, before sealing.
    encoded: Box<[u8]>,
    /// An `Ack` or `BadCluster` encoded by [`wire`], before sealing.
    direct: Vec<u8>,
    /// The sealed datagram being sent.
    sealed: Vec<u8>,
}

/// What [`SealedSocket::recv`] waited for.
enum Arrival {
    /// chitchat decoded a datagram handed to it through an inbox.
    Decoded(anyhow::Result<RecvOutcome>),
    /// A datagram from the network.
    Network(io::Result<(usize, SocketAddr)>),
}

#[async_trait]
impl Socket for SealedSocket {
    fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self
            .network
            .local_addr()
            .map_err(|source| TransportError::Io {
                what: "local address",
                source,
            })?)
    }

    async fn send(
        &mut self,
        to: SocketAddr,
        envelope: ChitchatEnvelope,
    ) -> anyhow::Result<SendOutcome> {
        let plaintext = if wire::encode(&envelope, &mut self.direct) {
            &self.direct[..]
        } else {
            let len = self.codec.encode(envelope, &mut self.encoded).await?;
            &self.encoded[..len]
        };
        let bytes = plaintext.len() + OVERHEAD;
        if bytes > MAX_DATAGRAM {
            return Err(TransportError::TooLarge { bytes }.into());
        }
        self.sealer
            .seal(&self.keys, plaintext, now_ms(), &mut self.sealed);
        let num_bytes_sent = self
            .network
            .send_to(&self.sealed, to)
            .await
            .map_err(|source| TransportError::Io {
                what: "send",
                source,
            })?;
        Ok(SendOutcome { num_bytes_sent })
    }

    /// Cancel-safe, as chitchat needs: every await is a socket receive; a
    /// datagram decoded here is returned with no await in between, and one
    /// handed to the codec socket stays there until a later call takes it.
    ///
    /// An `Ack` or `BadCluster` is decoded here and returned at once, so it
    /// may overtake a `Syn` or `SynAck` received just before it and still in
    /// the codec socket (only while that socket waits for the reactor, see
    /// [`Codec::in_flight`]). UDP reorders datagrams too; chitchat handles
    /// every message independently of the others.
    async fn recv(&mut self) -> anyhow::Result<RecvOutcome> {
        loop {
            let arrival = {
                let SealedSocket {
                    network,
                    codec,
                    received,
                    ..
                } = self;
                if codec.in_flight > 0 {
                    tokio::select! {
                        // What is already opened goes to chitchat first.
                        biased;
                        decoded = codec.chitchat.recv() => Arrival::Decoded(decoded),
                        datagram = network.recv_from(received) => Arrival::Network(datagram),
                    }
                } else {
                    // Not through `select!`: it would build (and allocate)
                    // the codec's receive future only to leave it unpolled.
                    Arrival::Network(network.recv_from(received).await)
                }
            };
            match arrival {
                Arrival::Decoded(decoded) => {
                    if let Some(outcome) = self.decoded_by_codec(decoded)? {
                        return Ok(outcome);
                    }
                }
                Arrival::Network(Err(err)) if is_transient(&err) => {
                    tracing::debug!(error = %err, "transient gossip receive error");
                }
                Arrival::Network(Err(source)) => {
                    return Err(TransportError::Io {
                        what: "receive",
                        source,
                    }
                    .into());
                }
                Arrival::Network(Ok((len, from))) => {
                    if let Some(outcome) = self.received_from_network(len, from) {
                        return Ok(outcome);
                    }
                }
            }
        }
    }
}

impl SealedSocket {
    /// What chitchat's codec socket decoded, with the real peer's address;
    /// `None` for a datagram from anyone but an inbox (dropped and logged).
    fn decoded_by_codec(
        &mut self,
        decoded: anyhow::Result<RecvOutcome>,
    ) -> Result<Option<RecvOutcome>, TransportError> {
        let outcome = decoded.map_err(TransportError::Codec)?;
        let Some(peer) = self.codec.peer_of(outcome.from_addr) else {
            tracing::warn!(
                from = %outcome.from_addr,
                "dropped a gossip datagram that reached the loopback codec socket from an unknown address (another local process, or an inbox closed since)"
            );
            return Ok(None);
        };
        self.codec.in_flight = self.codec.in_flight.saturating_sub(1);
        Ok(Some(RecvOutcome {
            from_addr: peer,
            ..outcome
        }))
    }

    /// Opens the `len`-byte datagram from `from` in the receive buffer: an
    /// `Ack` or `BadCluster` is returned decoded; a `Syn` or `SynAck` goes to
    /// the codec socket (`None`: chitchat gets it from there); anything that
    /// does not open or decode is counted or logged, and dropped (`None`).
    fn received_from_network(&mut self, len: usize, from: SocketAddr) -> Option<RecvOutcome> {
        if len > MAX_DATAGRAM {
            // Truncated by the buffer: no valid sealed datagram is this long.
            self.rejections.record(Rejection::Malformed, from, len);
            return None;
        }
        let plaintext = match self
            .opener
            .open(&self.keys, &mut self.received[..len], now_ms())
        {
            Ok(plaintext) => plaintext,
            Err(reason) => {
                self.rejections.record(reason, from, len);
                return None;
            }
        };
        match wire::decode(plaintext) {
            wire::Decoded::Envelope(envelope) => Some(RecvOutcome {
                from_addr: from,
                envelope,
                num_bytes_received: plaintext.len(),
            }),
            wire::Decoded::NeedsCodec => {
                self.codec.deliver(from, plaintext);
                None
            }
            wire::Decoded::Invalid(err) => {
                tracing::warn!(
                    error = ?err,
                    from = %from,
                    bytes = plaintext.len(),
                    "dropped an authentic gossip datagram chitchat cannot decode (a peer running an incompatible chitchat?)"
                );
                None
            }
        }
    }
}

/// chitchat's own UDP socket on loopback, used as the envelope codec, with
/// the sockets that carry bytes to and from it.
struct Codec {
    chitchat: CodecSocket,
    chitchat_addr: SocketAddr,
    /// Not registered with the reactor (see [`bind_connected`]).
    outbox: std::net::UdpSocket,
    outbox_addr: SocketAddr,
    inboxes: HashMap<SocketAddr, Inbox>,
    /// Inbox address → the peer it speaks for.
    peers: HashMap<SocketAddr, SocketAddr>,
    /// Increases with every delivery; orders inboxes by last use.
    deliveries: u64,
    /// Datagrams handed to chitchat and not yet decoded by it. The codec
    /// socket is polled only while some are: polling it empty would clear
    /// its readiness and make the next datagram wait for the reactor.
    in_flight: usize,
    /// An [`Codec::encode`] is under way (or was cancelled midway, leaving its
    /// datagram in the outbox).
    encoding: bool,
}

struct Inbox {
    /// Not registered with the reactor (see [`bind_connected`]).
    socket: std::net::UdpSocket,
    addr: SocketAddr,
    last_used: u64,
}

impl Codec {
    async fn open() -> Result<Codec, TransportError> {
        let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        let chitchat = CodecSocket::open(loopback)
            .await
            .map_err(TransportError::Codec)?;
        let chitchat_addr = chitchat.local_addr().map_err(TransportError::Codec)?;
        let outbox = bind_connected("gossip outbox", chitchat_addr)?;
        let outbox_addr = outbox.local_addr().map_err(|source| TransportError::Io {
            what: "outbox address",
            source,
        })?;
        Ok(Codec {
            chitchat,
            chitchat_addr,
            outbox,
            outbox_addr,
            inboxes: HashMap::new(),
            peers: HashMap::new(),
            deliveries: 0,
            in_flight: 0,
            encoding: false,
        })
    }

    /// Has chitchat encode `envelope` into `buf`; returns its length.
    async fn encode(
        &mut self,
        envelope: ChitchatEnvelope,
        buf: &mut [u8],
    ) -> Result<usize, TransportError> {
        // A send cancelled between the two steps below leaves its datagram
        // in the outbox: discard it, or it would go to the next peer.
        if self.encoding {
            while self.outbox.recv(buf).is_ok() {}
        }
        self.encoding = true;
        self.chitchat
            .send(self.outbox_addr, envelope)
            .await
            .map_err(TransportError::Codec)?;
        // Linux delivers a loopback datagram before send returns, so it is
        // read at once; the wait below is only for a kernel that has not.
        let deadline = Instant::now() + LOOPBACK_PATIENCE;
        loop {
            match self.outbox.recv(buf) {
                Ok(len) => {
                    self.encoding = false;
                    return Ok(len);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(TransportError::LoopbackLost);
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(source) => {
                    return Err(TransportError::Io {
                        what: "outbox receive",
                        source,
                    });
                }
            }
        }
    }

    /// Hands an opened datagram from `peer` to chitchat. Failures lose the
    /// datagram (as UDP may) and are logged.
    fn deliver(&mut self, peer: SocketAddr, plaintext: &[u8]) {
        self.deliveries += 1;
        if !self.inboxes.contains_key(&peer) {
            if let Err(err) = self.add_inbox(peer) {
                tracing::warn!(error = %err, peer = %peer, "cannot open a gossip inbox; datagram dropped");
                return;
            }
        }
        let Some(inbox) = self.inboxes.get_mut(&peer) else {
            return;
        };
        inbox.last_used = self.deliveries;
        match inbox.socket.send(plaintext) {
            Ok(_) => self.in_flight += 1,
            Err(err) => tracing::warn!(
                error = %err,
                peer = %peer,
                "cannot hand a gossip datagram to chitchat; dropped"
            ),
        }
    }

    fn add_inbox(&mut self, peer: SocketAddr) -> Result<(), TransportError> {
        if self.inboxes.len() >= MAX_INBOXES {
            let oldest = self
                .inboxes
                .iter()
                .min_by_key(|(_, inbox)| inbox.last_used)
                .map(|(peer, _)| *peer);
            if let Some(inbox) = oldest.and_then(|peer| self.inboxes.remove(&peer)) {
                self.peers.remove(&inbox.addr);
            }
        }
        let socket = bind_connected("gossip inbox", self.chitchat_addr)?;
        let addr = socket.local_addr().map_err(|source| TransportError::Io {
            what: "inbox address",
            source,
        })?;
        self.peers.insert(addr, peer);
        self.inboxes.insert(
            peer,
            Inbox {
                socket,
                addr,
                last_used: 0,
            },
        );
        Ok(())
    }

    /// The peer an inbox speaks for; `None` for any other sender.
    fn peer_of(&self, inbox: SocketAddr) -> Option<SocketAddr> {
        self.peers.get(&inbox).copied()
    }
}

/// A non-blocking loopback UDP socket connected to `peer`: it sends only
/// there, and the kernel gives it datagrams only from there. It is a std
/// socket, not registered with tokio's reactor: a loopback send or receive
/// completes at once, and a registered socket would wake the reactor for
/// every datagram it receives.
fn bind_connected(
    what: &'static str,
    peer: SocketAddr,
) -> Result<std::net::UdpSocket, TransportError> {
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let socket = std::net::UdpSocket::bind(loopback).map_err(|source| TransportError::Bind {
        what,
        addr: loopback,
        source,
    })?;
    socket
        .connect(peer)
        .and_then(|()| socket.set_nonblocking(true))
        .map_err(|source| TransportError::Io {
            what: "loopback connect",
            source,
        })?;
    Ok(socket)
}

/// Counts every rejected datagram and warns about them at a bounded rate.
struct RejectionLog {
    metrics: Arc<Metrics>,
    last_warned: Option<Instant>,
    /// Rejections not logged since the last warning.
    suppressed: u64,
}

impl RejectionLog {
    fn record(&mut self, reason: Rejection, from: SocketAddr, bytes: usize) {
        self.metrics
            .gossip_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .inc();
        let now = Instant::now();
        if self
            .last_warned
            .is_some_and(|at| now.duration_since(at) < REJECTION_LOG_EVERY)
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(
            reason = reason.as_str(),
            from = %from,
            bytes,
            suppressed = self.suppressed,
            "gossip datagram rejected: {reason} (at most one warning every {}s; all are counted in herald_gossip_rejected_total)",
            REJECTION_LOG_EVERY.as_secs()
        );
        self.last_warned = Some(now);
        self.suppressed = 0;
    }
}

/// Errors a UDP socket reports for an earlier datagram (an ICMP unreachable
/// from a peer that went away) rather than for itself; chitchat's own UDP
/// transport treats the same ones as transient.
fn is_transient(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::OutOfMemory
    )
}

/// Milliseconds since the Unix epoch (0 for a clock before 1970, which makes
/// every datagram stale rather than panicking).
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use chitchat::transport::UdpTransport;
    use chitchat::{
        ChitchatConfig, ChitchatId, ChitchatMessage, FailureDetectorConfig, ProtocolVersion,
        spawn_chitchat,
    };

    use super::*;

    const KEY: [u8; 32] = [3; 32];
    /// Bounds every wait on a loopback datagram or a gossip round.
    const PATIENCE: Duration = Duration::from_secs(10);

    fn loopback() -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
    }

    /// A message [`wire`] encodes itself.
    fn bad_cluster() -> ChitchatEnvelope {
        ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::BadCluster,
        }
    }

    /// A message only chitchat's codec socket can encode (its digest is
    /// empty: the digest type has no public constructor).
    fn syn() -> ChitchatEnvelope {
        ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::Syn {
                cluster_id: "transport-test".to_string(),
                digest: Default::default(),
            },
        }
    }

    async fn sealed_socket(metrics: &Arc<Metrics>) -> SealedSocket {
        let keys = Keyring::new(&[KEY]).expect("one key");
        SealedTransport::new(keys, 30_000, Arc::clone(metrics))
            .open_socket(loopback())
            .await
            .expect("opens")
    }

    fn rejected(metrics: &Metrics, reason: Rejection) -> u64 {
        metrics
            .gossip_rejected
            .get_or_create(&ReasonLabel {
                reason: reason.as_str(),
            })
            .get()
    }

    async fn recv_within(socket: &mut SealedSocket) -> RecvOutcome {
        tokio::time::timeout(PATIENCE, socket.recv())
            .await
            .expect("a datagram within the patience")
            .expect("received")
    }

    /// The bytes chitchat's own socket writes for `envelope`: the codec path.
    async fn encoded_by_chitchat(envelope: ChitchatEnvelope) -> Vec<u8> {
        let mut codec = Codec::open().await.expect("codec");
        let mut buf = vec![0; MAX_DATAGRAM + 1];
        let len = codec.encode(envelope, &mut buf).await.expect("encoded");
        buf.truncate(len);
        buf
    }

    /// What chitchat's own socket decodes from `bytes`.
    async fn decoded_by_chitchat(bytes: &[u8]) -> ChitchatEnvelope {
        let mut codec = CodecSocket::open(loopback()).await.expect("codec");
        let codec_addr = codec.local_addr().expect("addr");
        let sender = UdpSocket::bind(loopback()).await.expect("sender");
        sender.send_to(bytes, codec_addr).await.expect("sent");
        tokio::time::timeout(PATIENCE, codec.recv())
            .await
            .expect("decoded within the patience")
            .expect("chitchat decodes it")
            .envelope
    }

    /// A real `Ack` as chitchat writes it: a chitchat node with some state,
    /// seeded to a plain UDP tap, is answered a `SynAck` carrying an empty
    /// digest, and replies with an `Ack` holding its whole state.
    async fn ack_written_by_chitchat(version: ProtocolVersion) -> Vec<u8> {
        let tap = UdpSocket::bind(loopback()).await.expect("tap");
        let tap_addr = tap.local_addr().expect("addr");
        // The node's port is learnt from its first datagram; the tap answers
        // wherever datagrams come from, as chitchat does.
        let config = ChitchatConfig {
            chitchat_id: ChitchatId::new("wire-test", 1, loopback()),
            cluster_id: "wire-test".to_string(),
            gossip_interval: Duration::from_millis(20),
            listen_addr: loopback(),
            seed_nodes: vec![tap_addr.to_string()],
            failure_detector_config: FailureDetectorConfig::default(),
            marked_for_deletion_grace_period: Duration::from_secs(60),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: version,
        };
        let state = vec![
            ("http".to_string(), "http://127.0.0.1:8080".to_string()),
            ("load".to_string(), "17".to_string()),
        ];
        let node = spawn_chitchat(config, state, &UdpTransport)
            .await
            .expect("chitchat starts");
        let mut codec = CodecSocket::open(loopback()).await.expect("codec");
        let codec_addr = codec.local_addr().expect("addr");
        let mut buf = vec![0; MAX_DATAGRAM + 1];
        let ack = tokio::time::timeout(PATIENCE, async {
            // The node's first Syn comes to its seed, the tap.
            let (_, node_addr) = tap.recv_from(&mut buf).await.expect("a syn");
            let syn_ack = ChitchatEnvelope {
                version,
                message: ChitchatMessage::SynAck {
                    digest: Default::default(),
                    delta: Default::default(),
                },
            };
            codec.send(tap_addr, syn_ack).await.expect("encoded");
            loop {
                let (len, from) = tap.recv_from(&mut buf).await.expect("a datagram");
                if from == codec_addr {
                    tap.send_to(&buf[..len], node_addr).await.expect("relayed");
                } else if from == node_addr && buf.get(3) == Some(&2) {
                    // Message type 2: the node's Ack (it sends Syns too).
                    return buf[..len].to_vec();
                }
            }
        })
        .await
        .expect("the node answers within the patience");
        node.shutdown().await.expect("chitchat stops");
        ack
    }

    #[tokio::test]
    async fn an_ack_is_encoded_and_decoded_here_exactly_as_chitchats_own_socket_does() {
        for version in [ProtocolVersion::V0, ProtocolVersion::V1] {
            let written = ack_written_by_chitchat(version).await;
            let by_chitchat = decoded_by_chitchat(&written).await;
            let wire::Decoded::Envelope(here) = wire::decode(&written) else {
                panic!("an Ack is decoded without the codec ({version:?})");
            };
            assert!(
                matches!(&here.message, ChitchatMessage::Ack { delta } if format!("{delta:?}").contains("load")),
                "an Ack carrying the node's state ({version:?}): {here:?}"
            );
            assert_eq!(here, by_chitchat, "decoded the same ({version:?})");

            let mut encoded_here = Vec::new();
            assert!(wire::encode(&here, &mut encoded_here));
            assert_eq!(
                encoded_here,
                encoded_by_chitchat(by_chitchat).await,
                "same bytes as the codec path ({version:?})"
            );
            assert_eq!(
                encoded_here, written,
                "same bytes as the node sent ({version:?})"
            );
        }
    }

    #[tokio::test]
    async fn bad_cluster_and_an_empty_ack_are_encoded_here_as_chitchat_encodes_them() {
        let envelopes = || {
            [
                bad_cluster(),
                ChitchatEnvelope {
                    version: ProtocolVersion::V1,
                    message: ChitchatMessage::Ack {
                        delta: Default::default(),
                    },
                },
            ]
        };
        for (envelope, reference) in envelopes().into_iter().zip(envelopes()) {
            let mut encoded_here = Vec::new();
            assert!(wire::encode(&envelope, &mut encoded_here));
            let by_chitchat = encoded_by_chitchat(reference).await;
            assert_eq!(encoded_here, by_chitchat, "{envelope:?}");
            let wire::Decoded::Envelope(decoded) = wire::decode(&by_chitchat) else {
                panic!("decoded without the codec: {envelope:?}");
            };
            assert_eq!(decoded, envelope);
        }
    }

    #[tokio::test]
    async fn syn_and_anything_not_chitchats_are_left_to_the_codec() {
        let mut buf = Vec::new();
        assert!(!wire::encode(&syn(), &mut buf), "a Syn needs the codec");
        assert!(buf.is_empty());
        let syn_bytes = encoded_by_chitchat(syn()).await;
        let mut bad_magic = encoded_by_chitchat(bad_cluster()).await;
        bad_magic[0] ^= 0xff;
        for bytes in [&syn_bytes[..], &bad_magic[..], &[], &syn_bytes[..3]] {
            assert!(
                matches!(wire::decode(bytes), wire::Decoded::NeedsCodec),
                "{bytes:?}"
            );
        }
        let mut truncated_ack = encoded_by_chitchat(ChitchatEnvelope {
            version: ProtocolVersion::V0,
            message: ChitchatMessage::Ack {
                delta: Default::default(),
            },
        })
        .await;
        truncated_ack.pop();
        assert!(matches!(
            wire::decode(&truncated_ack),
            wire::Decoded::Invalid(_)
        ));
    }

    #[tokio::test]
    async fn sealed_datagrams_reach_chitchat_with_the_real_sender_address_by_either_path() {
        let metrics = Arc::new(Metrics::default());
        let mut a = sealed_socket(&metrics).await;
        let mut b = sealed_socket(&metrics).await;
        let a_addr = a.local_addr().expect("addr");
        let b_addr = b.local_addr().expect("addr");
        // Decoded here.
        let sent = a.send(b_addr, bad_cluster()).await.expect("sent");
        assert_eq!(
            sent.num_bytes_sent,
            4 + OVERHEAD,
            "a 4-byte message, sealed"
        );
        let received = recv_within(&mut b).await;
        assert_eq!(received.from_addr, a_addr);
        assert_eq!(received.envelope, bad_cluster());
        assert_eq!(received.num_bytes_received, 4);
        // Decoded by the codec socket.
        a.send(b_addr, syn()).await.expect("sent");
        let received = recv_within(&mut b).await;
        assert_eq!(received.from_addr, a_addr);
        assert_eq!(received.envelope, syn());
    }

    #[tokio::test]
    async fn datagrams_from_two_peers_by_both_paths_each_reach_chitchat_with_their_sender() {
        let metrics = Arc::new(Metrics::default());
        let mut a = sealed_socket(&metrics).await;
        let mut c = sealed_socket(&metrics).await;
        let mut b = sealed_socket(&metrics).await;
        let b_addr = b.local_addr().expect("addr");
        let a_addr = a.local_addr().expect("addr");
        let c_addr = c.local_addr().expect("addr");
        a.send(b_addr, syn()).await.expect("sent");
        c.send(b_addr, bad_cluster()).await.expect("sent");
        a.send(b_addr, bad_cluster()).await.expect("sent");
        c.send(b_addr, syn()).await.expect("sent");
        let mut received = Vec::new();
        for _ in 0..4 {
            let outcome = recv_within(&mut b).await;
            let kind = match outcome.envelope.message {
                ChitchatMessage::Syn { .. } => "syn",
                _ => "bad cluster",
            };
            received.push((outcome.from_addr, kind));
        }
        received.sort();
        let mut expected = vec![
            (a_addr, "syn"),
            (a_addr, "bad cluster"),
            (c_addr, "syn"),
            (c_addr, "bad cluster"),
        ];
        expected.sort();
        assert_eq!(received, expected);
    }

    #[tokio::test]
    async fn plain_and_injected_datagrams_never_reach_chitchat() {
        let metrics = Arc::new(Metrics::default());
        let mut a = sealed_socket(&metrics).await;
        let mut b = sealed_socket(&metrics).await;
        let b_addr = b.local_addr().expect("addr");
        // A plain chitchat datagram (encoded by chitchat itself) to the
        // gossip port, and the same sent straight to the loopback codec.
        let mut plain = CodecSocket::open(loopback())
            .await
            .expect("plain chitchat socket");
        plain.send(b_addr, syn()).await.expect("sent");
        plain
            .send(b.codec.chitchat_addr, syn())
            .await
            .expect("sent");
        // Then a genuine one, through the codec too: the only one chitchat gets.
        let a_addr = a.local_addr().expect("addr");
        a.send(b_addr, syn()).await.expect("sent");
        let received = recv_within(&mut b).await;
        assert_eq!(received.from_addr, a_addr);
        assert_eq!(rejected(&metrics, Rejection::Malformed), 1);
    }
}
