//! The SSE side: many connections, each reading its stream and accounting for
//! every event it receives.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;
use tokio_util::sync::CancellationToken;

use crate::options::Options;
use crate::publishers::Published;

/// Latency histograms are sharded to keep lock contention low.
const SHARDS: usize = 16;

/// What one connection has seen.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Index of the user this connection authenticates as.
    pub user: usize,
    /// Index of the target (its user, or 0 for the topic) whose events it expects.
    pub target: usize,
    /// Whether this connection deliberately stops reading.
    pub slow: bool,
    /// Highest per-target sequence seen.
    pub last: AtomicU64,
    /// Events received, duplicates included.
    pub received: AtomicU64,
    /// Events at or below the highest sequence already seen.
    pub duplicated: AtomicU64,
    /// Events that skipped ahead of the next expected sequence.
    pub jumped: AtomicU64,
    /// Times the stream ended (closed by the server).
    pub ended: AtomicU64,
}

/// All connections of the run.
#[derive(Debug)]
pub struct Subscribers {
    /// One entry per connection.
    pub connections: Vec<Arc<ConnectionStats>>,
    latencies: Arc<Vec<Mutex<Histogram<u64>>>>,
    connected: AtomicUsize,
    failed: AtomicUsize,
    stop: CancellationToken,
}

impl Subscribers {
    /// Opens every connection (bounded concurrency) and starts reading.
    pub async fn connect(options: &Options) -> anyhow::Result<Subscribers> {
        let latencies = Arc::new(
            (0..SHARDS)
                .map(|_| {
                    Mutex::new(
                        Histogram::new_with_bounds(1, 120_000_000, 3)
                            .expect("static bounds are valid"),
                    )
                })
                .collect::<Vec<_>>(),
        );
        let servers: Vec<SocketAddr> = options
            .urls
            .iter()
            .map(|url| {
                url.trim_start_matches("http://")
                    .trim_end_matches('/')
                    .parse()
                    .with_context(|| format!("{url}: expected http://IP:PORT"))
            })
            .collect::<anyhow::Result<_>>()?;
        let slow_count = (options.connections as f64 * options.slow_fraction).round() as usize;
        let subscribers = Subscribers {
            connections: (0..options.connections)
                .map(|i| {
                    Arc::new(ConnectionStats {
                        user: i % options.users,
                        target: if options.topic.is_some() {
                            0
                        } else {
                            i % options.users
                        },
                        slow: i < slow_count,
                        ..Default::default()
                    })
                })
                .collect(),
            latencies,
            connected: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            stop: CancellationToken::new(),
        };
        let permits = Arc::new(tokio::sync::Semaphore::new(options.connect_concurrency));
        let mut opened = Vec::with_capacity(options.connections);
        for (i, stats) in subscribers.connections.iter().enumerate() {
            let permit = Arc::clone(&permits)
                .acquire_owned()
                .await
                .context("semaphore closed")?;
            let server = servers[i % servers.len()];
            let source = IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                0,
                1 + (i % options.source_ips as usize) as u8,
            ));
            let user = format!("lt-u{}", stats.user);
            let token = crate::publishers::subscriber_token(
                &options.secret,
                &user,
                options.topic.as_deref(),
            )?;
            let path = match &options.topic {
                Some(topic) => format!("/v1/stream?access_token={token}&topic={topic}"),
                None => format!("/v1/stream?access_token={token}"),
            };
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let stats = Arc::clone(stats);
            let latencies = Arc::clone(&subscribers.latencies);
            let stop = subscribers.stop.clone();
            let ready = Ready {
                tx: ready_tx,
                _permit: permit,
            };
            tokio::spawn(async move {
                let result = stream(
                    server,
                    source,
                    path,
                    &stats,
                    &latencies,
                    i % SHARDS,
                    stop,
                    ready,
                )
                .await;
                if let Err(err) = result {
                    tracing_free_log(&format!("connection {i}: {err:#}"));
                }
            });
            opened.push(ready_rx);
        }
        for ready in opened {
            match ready.await {
                Ok(true) => subscribers.connected.fetch_add(1, Ordering::Relaxed),
                _ => subscribers.failed.fetch_add(1, Ordering::Relaxed),
            };
        }
        Ok(subscribers)
    }

    /// Connections that got a 200 answer.
    pub fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    /// Connections that failed to open.
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::Relaxed)
    }

    /// Whether every reading connection has received every event published to it.
    pub fn all_received(&self, published: &Published) -> bool {
        self.connections
            .iter()
            .filter(|c| !c.slow)
            .all(|c| c.last.load(Ordering::Relaxed) >= published.sent(c.target))
    }

    /// The merged latency histogram, microseconds.
    pub fn latency(&self) -> Histogram<u64> {
        let mut merged =
            Histogram::new_with_bounds(1, 120_000_000, 3).expect("static bounds are valid");
        for shard in self.latencies.iter() {
            if let Ok(shard) = shard.lock() {
                let _ = merged.add(&*shard);
            }
        }
        merged
    }

    /// Ends every connection.
    pub fn close(&self) {
        self.stop.cancel();
    }
}

/// Tells the connecting loop how the connection went, and frees its slot.
struct Ready {
    tx: tokio::sync::oneshot::Sender<bool>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Ready {
    fn send(self, ok: bool) {
        let _ = self.tx.send(ok);
    }
}

fn tracing_free_log(message: &str) {
    eprintln!("{message}");
}

/// Microseconds since the Unix epoch.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

#[allow(clippy::too_many_arguments)]
async fn stream(
    server: SocketAddr,
    source: IpAddr,
    path: String,
    stats: &ConnectionStats,
    latencies: &[Mutex<Histogram<u64>>],
    shard: usize,
    stop: CancellationToken,
    ready: Ready,
) -> anyhow::Result<()> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = match tokio::time::timeout(Duration::from_secs(10), socket.connect(server)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(err)) => {
            ready.send(false);
            return Err(err.into());
        }
        Err(_) => {
            ready.send(false);
            bail!("connect timed out");
        }
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    let request = hyper::Request::get(path)
        .header("host", server.to_string())
        .body(Empty::<Bytes>::new())?;
    let reading = async {
        let response = sender.send_request(request).await?;
        let ok = response.status() == 200;
        ready.send(ok);
        if !ok {
            bail!("status {}", response.status());
        }
        if stats.slow {
            // Hold the connection without reading until the server gives up on it.
            stop.cancelled().await;
            return Ok(());
        }
        let mut body = response.into_body();
        let mut scanner = Scanner::default();
        loop {
            let frame = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                frame = body.frame() => frame,
            };
            let Some(frame) = frame else { break };
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            scanner.feed(&data, |k, t| {
                let now = now_micros();
                let last = stats.last.load(Ordering::Relaxed);
                if k <= last {
                    stats.duplicated.fetch_add(1, Ordering::Relaxed);
                } else {
                    if k != last + 1 {
                        stats.jumped.fetch_add(1, Ordering::Relaxed);
                    }
                    stats.last.store(k, Ordering::Relaxed);
                }
                stats.received.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut histogram) = latencies[shard].lock() {
                    let _ = histogram.record(now.saturating_sub(t).max(1));
                }
            });
        }
        stats.ended.fetch_add(1, Ordering::Relaxed);
        Ok(())
    };
    tokio::select! {
        result = connection => { result?; Ok(()) }
        result = reading => result,
    }
}

/// Finds `data:` lines in SSE bytes and extracts `"k":N` and `"t":N` from them,
/// without allocating per event.
#[derive(Debug, Default)]
struct Scanner {
    partial: Vec<u8>,
}

impl Scanner {
    fn feed(&mut self, bytes: &[u8], mut on_event: impl FnMut(u64, u64)) {
        let mut rest = bytes;
        while let Some(at) = rest.iter().position(|&b| b == b'\n') {
            let line = if self.partial.is_empty() {
                &rest[..at]
            } else {
                self.partial.extend_from_slice(&rest[..at]);
                &self.partial[..]
            };
            if let Some(data) = line.strip_prefix(b"data: ") {
                if let (Some(k), Some(t)) =
                    (number_after(data, b"\"k\":"), number_after(data, b"\"t\":"))
                {
                    on_event(k, t);
                }
            }
            self.partial.clear();
            rest = &rest[at + 1..];
        }
        self.partial.extend_from_slice(rest);
    }
}

fn number_after(haystack: &[u8], key: &[u8]) -> Option<u64> {
    let start = haystack.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = haystack[start..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    std::str::from_utf8(&haystack[start..start + digits])
        .ok()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scanner_reads_numbers_from_data_lines_split_across_chunks() {
        let mut scanner = Scanner::default();
        let mut seen = Vec::new();
        scanner.feed(b"id: 1-1\ndata: {\"k\":1,\"p\":\"x\",\"t\":5", |k, t| {
            seen.push((k, t))
        });
        scanner.feed(b"00}\n\n: hb\n\ndata: {\"k\":2,\"t\":7}\n\n", |k, t| {
            seen.push((k, t))
        });
        assert_eq!(seen, vec![(1, 500), (2, 7)]);
    }
}
