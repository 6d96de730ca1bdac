//! UDP relays in front of gossip ports, so a test can partition a node from
//! its peers without touching anything else (NATS, HTTP).
//!
//! Each node advertises its relay's address; the relay forwards every datagram
//! to the node's real port through one socket per sender, and sends the
//! node's answers back from the relay's own address. A [`Partition`] shared by
//! all relays of a test decides what is dropped: every datagram to or from an
//! isolated node's real port. [`UdpRelay::captured`] returns the last
//! datagrams it forwarded to the node (for replay attacks in tests).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

/// Which nodes (by real gossip address) are cut off. Shared by the relays.
#[derive(Debug, Clone, Default)]
pub struct Partition {
    isolated: Arc<Mutex<HashSet<SocketAddr>>>,
}

impl Partition {
    /// Drops everything to and from the node gossiping on `node` from now on.
    pub fn isolate(&self, node: SocketAddr) {
        self.lock().insert(node);
    }

    /// Lets every node talk again.
    pub fn heal(&self) {
        self.lock().clear();
    }

    fn blocks(&self, a: SocketAddr, b: SocketAddr) -> bool {
        let isolated = self.lock();
        isolated.contains(&a) || isolated.contains(&b)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<SocketAddr>> {
        self.isolated.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How many forwarded datagrams a relay keeps for [`UdpRelay::captured`].
const CAPTURED: usize = 32;

/// A relay in front of one node's gossip port; stops when dropped.
#[derive(Debug)]
pub struct UdpRelay {
    addr: SocketAddr,
    stop: CancellationToken,
    captured: Captured,
}

/// The last datagrams forwarded to the node, oldest first.
type Captured = Arc<Mutex<std::collections::VecDeque<Vec<u8>>>>;

impl UdpRelay {
    /// Starts a relay on a free loopback port for the node gossiping on
    /// `node` (its real listen address).
    pub async fn start(node: SocketAddr, partition: Partition) -> std::io::Result<UdpRelay> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let stop = CancellationToken::new();
        let captured = Captured::default();
        let relay = Relay {
            front,
            node,
            partition,
            stop: stop.clone(),
            backs: HashMap::new(),
            captured: Arc::clone(&captured),
        };
        tokio::spawn(relay.run());
        Ok(UdpRelay {
            addr,
            stop,
            captured,
        })
    }

    /// The last datagrams (up to 32) the relay forwarded to the node, oldest
    /// first: genuine traffic a test can replay.
    pub fn captured(&self) -> Vec<Vec<u8>> {
        let captured = self.captured.lock().unwrap_or_else(|e| e.into_inner());
        captured.iter().cloned().collect()
    }

    /// The address the node advertises and peers send to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct Relay {
    front: Arc<UdpSocket>,
    node: SocketAddr,
    partition: Partition,
    stop: CancellationToken,
    /// One socket towards the node per sender, so the node's answers can be
    /// told apart and sent back to the right sender.
    backs: HashMap<SocketAddr, Arc<UdpSocket>>,
    captured: Captured,
}

impl Relay {
    async fn run(mut self) {
        let mut buf = vec![0u8; 65_536];
        loop {
            let (len, sender) = tokio::select! {
                _ = self.stop.cancelled() => return,
                received = self.front.recv_from(&mut buf) => match received {
                    Ok(received) => received,
                    Err(_) => continue,
                },
            };
            if self.partition.blocks(sender, self.node) {
                continue;
            }
            let back = match self.back_for(sender).await {
                Some(back) => back,
                None => continue,
            };
            let _ = back.send_to(&buf[..len], self.node).await;
            let mut captured = self.captured.lock().unwrap_or_else(|e| e.into_inner());
            if captured.len() == CAPTURED {
                captured.pop_front();
            }
            captured.push_back(buf[..len].to_vec());
        }
    }

    async fn back_for(&mut self, sender: SocketAddr) -> Option<Arc<UdpSocket>> {
        if let Some(back) = self.backs.get(&sender) {
            return Some(Arc::clone(back));
        }
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await.ok()?);
        self.backs.insert(sender, Arc::clone(&back));
        // Answers from the node go back to `sender` from the relay's address.
        let front = Arc::clone(&self.front);
        let node = self.node;
        let partition = self.partition.clone();
        let stop = self.stop.clone();
        let reader = Arc::clone(&back);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let len = tokio::select! {
                    _ = stop.cancelled() => return,
                    received = reader.recv_from(&mut buf) => match received {
                        Ok((len, _)) => len,
                        Err(_) => continue,
                    },
                };
                if partition.blocks(sender, node) {
                    continue;
                }
                let _ = front.send_to(&buf[..len], sender).await;
            }
        });
        Some(back)
    }
}
