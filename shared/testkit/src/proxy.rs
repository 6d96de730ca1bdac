//! A loopback TCP proxy the test controls: it forwards connections to an
//! upstream and can drop all of them at once, as a network failure or a load
//! balancer reload would, while still accepting new ones.
//!
//! It can also *hold* new connections: they are accepted but not forwarded
//! until [`TcpProxy::release`], like a route that is down. A test uses this to
//! know, without timing, that a client which lost its connection cannot be
//! back before the test is ready (for example, to publish events the client
//! must then receive through a `Last-Event-ID` replay).
//!
//! And it can *freeze* the connections it forwards: bytes stop moving both
//! ways but no socket closes, as in a network partition that TCP outlasts;
//! [`TcpProxy::thaw`] delivers what was held back, in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A running proxy; stops (and drops every connection) when dropped.
#[derive(Debug)]
pub struct TcpProxy {
    /// Where clients connect (loopback, ephemeral port).
    addr: SocketAddr,
    /// Bumped by [`TcpProxy::cut_all`]; every forwarding task watches it and
    /// ends (closing both sockets) when it changes.
    generation: watch::Sender<u64>,
    /// `true` while new connections are held instead of forwarded.
    holding: watch::Sender<bool>,
    /// `true` while forwarded connections move no bytes.
    frozen: watch::Sender<bool>,
    /// Connections currently forwarded to the upstream.
    open: Arc<AtomicUsize>,
    /// Where connections go, in turn (round robin).
    upstreams: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    /// Connections accepted and waiting for [`TcpProxy::release`].
    waiting: Arc<AtomicUsize>,
    /// Cancelled on drop: ends the accept loop and every task.
    stop: CancellationToken,
}

impl TcpProxy {
    /// Starts a proxy on an ephemeral loopback port forwarding to `upstream`.
    /// Fails only if no loopback port can be bound.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<TcpProxy> {
        Self::balanced(vec![upstream]).await
    }

    /// Starts a proxy that sends each new connection to the next of
    /// `upstreams` in turn, as a round-robin load balancer does.
    pub async fn balanced(upstreams: Vec<SocketAddr>) -> std::io::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (generation, cuts) = watch::channel(0u64);
        let (holding, gate) = watch::channel(false);
        let (frozen, ice) = watch::channel(false);
        let proxy = TcpProxy {
            addr,
            generation,
            holding,
            frozen,
            open: Arc::new(AtomicUsize::new(0)),
            upstreams: Arc::new(std::sync::Mutex::new(upstreams)),
            waiting: Arc::new(AtomicUsize::new(0)),
            stop: CancellationToken::new(),
        };
        let open = Arc::clone(&proxy.open);
        let waiting = Arc::clone(&proxy.waiting);
        let stop = proxy.stop.clone();
        let upstreams = Arc::clone(&proxy.upstreams);
        let mut turn = 0usize;
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                // Only cuts made from now on end this connection.
                let mut cut = cuts.clone();
                cut.mark_unchanged();
                let upstream = {
                    let upstreams = upstreams.lock().unwrap_or_else(|e| e.into_inner());
                    turn = turn.wrapping_add(1);
                    match upstreams.get(turn % upstreams.len().max(1)) {
                        Some(upstream) => *upstream,
                        None => continue,
                    }
                };
                let connection = Connection {
                    client,
                    upstream,
                    cut,
                    gate: gate.clone(),
                    ice: ice.clone(),
                    open: Arc::clone(&open),
                    waiting: Arc::clone(&waiting),
                    stop: stop.clone(),
                };
                tokio::spawn(connection.forward());
            }
        });
        Ok(proxy)
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Adds an upstream to the rotation (a node joining behind the balancer).
    pub fn add_upstream(&self, upstream: SocketAddr) {
        self.upstreams
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(upstream);
    }

    /// Closes every proxied connection now, on both sides; later connections
    /// work again. Connections being held are not affected.
    pub fn cut_all(&self) {
        self.generation.send_modify(|generation| *generation += 1);
    }

    /// From now on, accepts new connections but does not forward them until
    /// [`TcpProxy::release`]: a client trying to reconnect waits, connected to
    /// the proxy but not to the upstream.
    pub fn hold(&self) {
        self.holding.send_replace(true);
    }

    /// Forwards the held connections and every later one.
    pub fn release(&self) {
        self.holding.send_replace(false);
    }

    /// Stops moving bytes on every forwarded connection, without closing
    /// any: a silent partition, noticed only by whoever expects an answer.
    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    /// Moves bytes again, starting with what was held back.
    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// Connections currently forwarded to the upstream.
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Connections accepted while holding, waiting to be forwarded.
    pub fn held(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// One accepted client connection and what it needs to be forwarded.
struct Connection {
    client: TcpStream,
    upstream: SocketAddr,
    cut: watch::Receiver<u64>,
    gate: watch::Receiver<bool>,
    ice: watch::Receiver<bool>,
    open: Arc<AtomicUsize>,
    waiting: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Connection {
    /// Waits while the proxy holds, then copies bytes both ways until either
    /// side closes, the proxy cuts, or the proxy is dropped.
    async fn forward(mut self) {
        if *self.gate.borrow() {
            self.waiting.fetch_add(1, Ordering::SeqCst);
            let released = tokio::select! {
                _ = self.stop.cancelled() => false,
                released = self.gate.wait_for(|holding| !holding) => released.is_ok(),
            };
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            if !released {
                return;
            }
            // A cut made while it waited was not meant for it.
            self.cut.mark_unchanged();
        }
        let Ok(mut server) = TcpStream::connect(self.upstream).await else {
            return;
        };
        self.open.fetch_add(1, Ordering::SeqCst);
        let (mut client_in, mut client_out) = self.client.split();
        let (mut server_in, mut server_out) = server.split();
        tokio::select! {
            _ = pump(&mut client_in, &mut server_out, self.ice.clone()) => {}
            _ = pump(&mut server_in, &mut client_out, self.ice.clone()) => {}
            _ = self.cut.changed() => {}
            _ = self.stop.cancelled() => {}
        }
        self.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Copies bytes from `from` to `to` until either side closes; while frozen,
/// what was read waits (and nothing more is read) until the thaw.
async fn pump(
    from: &mut (impl AsyncReadExt + Unpin),
    to: &mut (impl AsyncWriteExt + Unpin),
    mut ice: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let read = from.read(&mut buf).await?;
        if ice.wait_for(|frozen| !frozen).await.is_err() {
            return Ok(());
        }
        if read == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..read]).await?;
    }
}
