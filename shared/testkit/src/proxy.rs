//! A loopback TCP proxy the test controls: it forwards connections to an
//! upstream and can drop all of them at once, as a network failure or a load
//! balancer reload would, while still accepting new ones.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// A running proxy; stops (and drops every connection) when dropped.
#[derive(Debug)]
pub struct TcpProxy {
    addr: SocketAddr,
    generation: watch::Sender<u64>,
    open: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl TcpProxy {
    /// Starts a proxy on an ephemeral loopback port forwarding to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<TcpProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (generation, _) = watch::channel(0u64);
        let open = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let proxy = TcpProxy {
            addr,
            generation,
            open: Arc::clone(&open),
            stop: stop.clone(),
        };
        let cuts = proxy.generation.subscribe();
        tokio::spawn(async move {
            loop {
                let (client, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => continue,
                    },
                };
                let mut cut = cuts.clone();
                cut.mark_unchanged();
                let stop = stop.clone();
                let open = Arc::clone(&open);
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let mut client = client;
                    open.fetch_add(1, Ordering::SeqCst);
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                        _ = stop.cancelled() => {}
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(proxy)
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every proxied connection now; later connections work again.
    pub fn cut_all(&self) {
        self.generation.send_modify(|generation| *generation += 1);
    }

    /// Connections currently proxied.
    pub fn connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
