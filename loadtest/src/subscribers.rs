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
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::options::{Api, Options};
use crate::publishers::Published;

/// Latency histograms are sharded to keep lock contention low.
const SHARDS: usize = 16;

/// What one connection has seen.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Index of the user this connection authenticates as.
    pub user: usize,
    /// The targets whose events it expects (its user, the topic, or both),
    /// each with the highest sequence seen.
    pub targets: Vec<TargetState>,
    /// Whether this connection deliberately stops reading.
    pub slow: bool,
    /// Events received, duplicates included.
    pub received: AtomicU64,
    /// Events at or below the highest sequence already seen.
    pub duplicated: AtomicU64,
    /// Events that skipped ahead of the next expected sequence.
    pub jumped: AtomicU64,
    /// New events whose SSE id's newest position is below one already seen
    /// (same epoch): the stream's position went back, so a resume from the
    /// later id would have skipped what came between.
    pub misordered: AtomicU64,
    /// Events for a target this connection does not follow.
    pub foreign: AtomicU64,
    /// The newest SSE id seen (epoch, sequence), for `misordered`.
    newest_id: Mutex<(u64, u64)>,
    /// Times the stream ended (closed by the server).
    pub ended: AtomicU64,
    /// Times the connection was opened again after the first.
    pub reconnects: AtomicU64,
    /// `herald.reset` events received: history was lost and the stream
    /// continues from the current position.
    pub resets: AtomicU64,
    /// Events skipped right after a `herald.reset`: the reset told the client,
    /// so they are not counted as lost (the reliability contract's exception).
    pub skipped_after_reset: AtomicU64,
    /// Events at or below the highest sequence seen that came after a
    /// `herald.reset` (before any newer event): the new history holds them
    /// again (a publisher's retry stored after the lost one), and a client
    /// that was told to refetch cannot tell; not counted as duplicates.
    pub repeated_after_reset: AtomicU64,
    /// Events of quiet targets (`--quiet-users`) received.
    pub quiet_received: AtomicU64,
    /// The longest any quiet target's event took from publish to here,
    /// microseconds: a lost live copy of a target that stays quiet shows
    /// here as the time its repair took.
    pub quiet_max_delay_us: AtomicU64,
}

/// One target a connection follows.
#[derive(Debug, Default)]
pub struct TargetState {
    /// Index of the target (a user, or the topic).
    pub target: usize,
    /// Highest sequence seen.
    pub last: AtomicU64,
    /// Whether a `herald.reset` came and no newer event of this target since
    /// (what it skipped shows only when the next newer event arrives, or at
    /// the end).
    pub reset_pending: std::sync::atomic::AtomicBool,
    /// Whether the target is a quiet user (`--quiet-users`).
    pub quiet: bool,
}

impl TargetState {
    fn new(target: usize) -> Self {
        TargetState {
            target,
            ..Default::default()
        }
    }
}

impl ConnectionStats {
    /// Accounts for one dispatched event (or reset).
    fn record(&self, dispatched: Dispatched, latencies: &Mutex<Histogram<u64>>) {
        let (g, k, t, id) = match dispatched {
            Dispatched::Event { g, k, t, id } => (g, k, t, id),
            Dispatched::Reset { id } => {
                self.resets.fetch_add(1, Ordering::Relaxed);
                for target in &self.targets {
                    target.reset_pending.store(true, Ordering::Relaxed);
                }
                if let Some(id) = id {
                    *lock(&self.newest_id) = id;
                }
                return;
            }
        };
        let Some(state) = self.targets.iter().find(|s| s.target as u64 == g) else {
            if self.foreign.fetch_add(1, Ordering::Relaxed) < 3 {
                eprintln!(
                    "user {}: an event for target {g}, which it does not follow",
                    self.user
                );
            }
            return;
        };
        let now = now_micros();
        let last = state.last.load(Ordering::Relaxed);
        let after_reset = state.reset_pending.load(Ordering::Relaxed);
        if k <= last {
            if after_reset {
                self.repeated_after_reset.fetch_add(1, Ordering::Relaxed);
            } else {
                self.duplicated.fetch_add(1, Ordering::Relaxed);
            }
        } else {
            if after_reset {
                // The reset told the client; what it skipped is not lost.
                state.reset_pending.store(false, Ordering::Relaxed);
                self.skipped_after_reset
                    .fetch_add(k - last - 1, Ordering::Relaxed);
            } else if k != last + 1 && self.jumped.fetch_add(1, Ordering::Relaxed) < 3 {
                eprintln!(
                    "target {}: event {k} after {last} (a gap), {} reconnect(s) so far",
                    state.target,
                    self.reconnects.load(Ordering::Relaxed)
                );
            }
            state.last.store(k, Ordering::Relaxed);
            if let Some(id) = id {
                let mut newest = lock(&self.newest_id);
                if id.0 == newest.0 && id.1 < newest.1 {
                    if self.misordered.fetch_add(1, Ordering::Relaxed) < 3 {
                        eprintln!(
                            "user {}: target {g}'s event {k} (id sequence {}) after id sequence {}: out of stream order",
                            self.user, id.1, newest.1
                        );
                    }
                } else {
                    *newest = id;
                }
            }
        }
        self.received.fetch_add(1, Ordering::Relaxed);
        let delay = now.saturating_sub(t).max(1);
        if state.quiet {
            self.quiet_received.fetch_add(1, Ordering::Relaxed);
            self.quiet_max_delay_us.fetch_max(delay, Ordering::Relaxed);
        }
        if let Ok(mut histogram) = latencies.lock() {
            let _ = histogram.record(delay);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether connections should hold their streams or stay away (to be owed
/// events, then come back all at once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Hold a stream open, reconnecting when it ends (if enabled).
    Stream,
    /// Close the stream and wait.
    Away,
}

/// All connections of the run.
#[derive(Debug)]
pub struct Subscribers {
    /// One entry per connection.
    pub connections: Vec<Arc<ConnectionStats>>,
    latencies: Arc<Vec<Mutex<Histogram<u64>>>>,
    connected: AtomicUsize,
    failed: AtomicUsize,
    /// Connections with a stream open right now.
    streaming: Arc<AtomicUsize>,
    phase: watch::Sender<Phase>,
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
                        targets: options
                            .targets_of(i % options.users)
                            .into_iter()
                            .map(|target| TargetState {
                                quiet: options.is_quiet(target),
                                ..TargetState::new(target)
                            })
                            .collect(),
                        slow: i < slow_count,
                        ..Default::default()
                    })
                })
                .collect(),
            latencies,
            connected: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            streaming: Arc::new(AtomicUsize::new(0)),
            phase: watch::channel(Phase::Stream).0,
            stop: CancellationToken::new(),
        };
        let permits = Arc::new(tokio::sync::Semaphore::new(options.connect_concurrency));
        let mut opened = Vec::with_capacity(options.connections);
        for (i, stats) in subscribers.connections.iter().enumerate() {
            let permit = Arc::clone(&permits)
                .acquire_owned()
                .await
                .context("semaphore closed")?;
            let source = IpAddr::V4(Ipv4Addr::new(
                127,
                0,
                0,
                1 + (i % options.source_ips as usize) as u8,
            ));
            let path = stream_path(options, stats.user)?;
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            let context = ConnectionContext {
                servers: servers.clone(),
                first_server: i % servers.len(),
                source,
                path,
                stats: Arc::clone(stats),
                latencies: Arc::clone(&subscribers.latencies),
                shard: i % SHARDS,
                stop: subscribers.stop.clone(),
                phase: subscribers.phase.subscribe(),
                streaming: Arc::clone(&subscribers.streaming),
                reconnect: options.reconnect,
                honor_retry: options.honor_retry,
            };
            let ready = Ready {
                tx: ready_tx,
                _permit: permit,
            };
            tokio::spawn(run_connection(context, ready, i));
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
            .flat_map(|c| &c.targets)
            .all(|t| t.last.load(Ordering::Relaxed) >= published.sent(t.target))
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

    /// Connections with a stream open right now.
    pub fn streaming(&self) -> usize {
        self.streaming.load(Ordering::Relaxed)
    }

    /// Sends every connection away (closing its stream) or back.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }

    /// Quiet targets' events received by reading connections, and the
    /// longest delay among them (microseconds).
    pub fn quiet(&self) -> (u64, u64) {
        self.connections
            .iter()
            .filter(|c| !c.slow)
            .fold((0, 0), |(received, max), c| {
                (
                    received + c.quiet_received.load(Ordering::Relaxed),
                    max.max(c.quiet_max_delay_us.load(Ordering::Relaxed)),
                )
            })
    }

    /// Total reconnections.
    pub fn reconnects(&self) -> u64 {
        self.connections
            .iter()
            .map(|c| c.reconnects.load(Ordering::Relaxed))
            .sum()
    }

    /// Ends every connection.
    pub fn close(&self) {
        self.stop.cancel();
    }
}

/// The request path of a stream of `user`: Herald's `/v1/stream` with a
/// token (and the topic), or nchan's `/sub/<channel>` of the user or topic.
fn stream_path(options: &Options, user: usize) -> anyhow::Result<String> {
    if options.api == Api::Nchan {
        // One channel per stream (no --mixed with nchan): the user's or the topic's.
        let target = options.targets_of(user).first().copied().unwrap_or(user);
        return Ok(format!("/sub/{}", options.nchan_channel(target)));
    }
    let token = crate::publishers::subscriber_token(
        &options.secret,
        &Options::user_name(user),
        options.topic.as_deref(),
    )?;
    Ok(match &options.topic {
        Some(topic) => format!("/v1/stream?access_token={token}&topic={topic}"),
        None => format!("/v1/stream?access_token={token}"),
    })
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

/// Everything one connection task needs.
struct ConnectionContext {
    servers: Vec<SocketAddr>,
    first_server: usize,
    source: IpAddr,
    path: String,
    stats: Arc<ConnectionStats>,
    latencies: Arc<Vec<Mutex<Histogram<u64>>>>,
    shard: usize,
    stop: CancellationToken,
    phase: watch::Receiver<Phase>,
    streaming: Arc<AtomicUsize>,
    reconnect: bool,
    honor_retry: bool,
}

/// How one stream ended.
enum Outcome {
    /// The run is over.
    Stopped,
    /// Sent away by the phase.
    Away,
    /// The server closed it.
    Ended,
    /// Opening or reading it failed (after the first stream: retried, as a
    /// browser retries network errors).
    Failed,
}

/// Holds one logical client across reconnects: like a browser, it resends its
/// last event id and (optionally) waits the server's `retry:` hint first.
async fn run_connection(mut context: ConnectionContext, ready: Ready, index: usize) {
    let mut ready = Some(ready);
    let mut scanner = Scanner::default();
    let mut server = context.first_server;
    loop {
        let outcome = match stream_once(&mut context, server, &mut scanner, &mut ready).await {
            Ok(outcome) => outcome,
            Err(err) => {
                // Failures to open the first stream end the client and are
                // reported; later ones (a killed node, say) are retried.
                if ready.is_some() {
                    tracing_free_log(&format!("connection {index}: {err:#}"));
                    Outcome::Stopped
                } else {
                    Outcome::Failed
                }
            }
        };
        if let Some(ready) = ready.take() {
            ready.send(false);
        }
        match outcome {
            Outcome::Stopped => return,
            Outcome::Away => {
                let back = context.phase.wait_for(|phase| *phase == Phase::Stream);
                tokio::select! {
                    _ = context.stop.cancelled() => return,
                    result = back => if result.is_err() { return },
                }
            }
            Outcome::Ended if !context.reconnect => return,
            Outcome::Ended | Outcome::Failed => {
                server = (server + 1) % context.servers.len();
            }
        }
        if context.honor_retry || matches!(outcome, Outcome::Ended | Outcome::Failed) {
            let wait = Duration::from_millis(scanner.retry_ms.max(50));
            tokio::select! {
                _ = context.stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        context.stats.reconnects.fetch_add(1, Ordering::Relaxed);
    }
}

/// Opens one stream (resuming from the scanner's last id) and reads it until
/// it ends, the phase sends the client away, or the run stops.
async fn stream_once(
    context: &mut ConnectionContext,
    server: usize,
    scanner: &mut Scanner,
    ready: &mut Option<Ready>,
) -> anyhow::Result<Outcome> {
    let server = context.servers[server];
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(context.source, 0))?;
    let tcp = tokio::time::timeout(Duration::from_secs(10), socket.connect(server))
        .await
        .map_err(|_| anyhow::anyhow!("connect timed out"))??;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    // Like a browser's EventSource (nchan serves EventSource only to requests
    // that ask for it).
    let mut request = hyper::Request::get(context.path.as_str())
        .header("host", server.to_string())
        .header("accept", "text/event-stream");
    if !scanner.last_id.is_empty() {
        request = request.header("last-event-id", scanner.last_id.as_str());
    }
    let request = request.body(Empty::<Bytes>::new())?;
    // Whatever the last connection left half-read is gone with it.
    scanner.partial.clear();
    scanner.pending_id = None;
    scanner.pending_event = None;
    let stats = &context.stats;
    let latencies = &context.latencies;
    let shard = context.shard;
    let stop = context.stop.clone();
    let streaming = &context.streaming;
    let phase = &mut context.phase;
    let reading = async {
        let response = sender.send_request(request).await?;
        let ok = response.status() == 200;
        if let Some(ready) = ready.take() {
            ready.send(ok);
        }
        if !ok {
            bail!("status {}", response.status());
        }
        streaming.fetch_add(1, Ordering::Relaxed);
        let _open = StreamingGuard(streaming);
        if stats.slow {
            // Hold the connection without reading until the run ends.
            stop.cancelled().await;
            return Ok(Outcome::Stopped);
        }
        let mut body = response.into_body();
        loop {
            let frame = tokio::select! {
                _ = stop.cancelled() => return Ok(Outcome::Stopped),
                _ = phase.wait_for(|phase| *phase == Phase::Away) => return Ok(Outcome::Away),
                frame = body.frame() => frame,
            };
            let Some(frame) = frame else { break };
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            scanner.feed(&data, |dispatched| {
                stats.record(dispatched, &latencies[shard])
            });
        }
        stats.ended.fetch_add(1, Ordering::Relaxed);
        Ok(Outcome::Ended)
    };
    tokio::select! {
        result = connection => { result?; Ok(Outcome::Ended) }
        result = reading => result,
    }
}

/// Counts a stream as open while it lives.
struct StreamingGuard<'a>(&'a AtomicUsize);

impl Drop for StreamingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the scanner hands over when an event is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dispatched {
    /// A load-test event: its target, per-target sequence, publish time and
    /// SSE id (epoch, sequence) when it had one.
    Event {
        g: u64,
        k: u64,
        t: u64,
        id: Option<(u64, u64)>,
    },
    /// `herald.reset`: history was lost; the stream continues from its id.
    Reset { id: Option<(u64, u64)> },
}

/// Finds `data:` lines in SSE bytes and extracts `"k":N` and `"t":N` from them,
/// and notices `herald.reset`, without allocating per event. Like a browser, it takes an event (and its
/// `id:`) only when the blank line that ends it arrives: a stream cut in the
/// middle of an event leaves that event to the resumed stream.
#[derive(Debug, Default)]
struct Scanner {
    partial: Vec<u8>,
    /// The last `id:` of a complete event, resent as `Last-Event-ID`.
    last_id: String,
    /// The `id:` of the event being read, until its blank line.
    pending_id: Option<String>,
    /// What the event being read is, until its blank line.
    pending_event: Option<Dispatched>,
    /// The last `retry:` hint, milliseconds.
    retry_ms: u64,
}

impl Scanner {
    fn feed(&mut self, bytes: &[u8], mut on_event: impl FnMut(Dispatched)) {
        let mut rest = bytes;
        while let Some(at) = rest.iter().position(|&b| b == b'\n') {
            let line = if self.partial.is_empty() {
                &rest[..at]
            } else {
                self.partial.extend_from_slice(&rest[..at]);
                &self.partial[..]
            };
            if line.is_empty() {
                // Dispatch: the event and its id count from now.
                let id = self.pending_id.take().map(|id| {
                    let parsed = parse_id(&id);
                    self.last_id = id;
                    parsed
                });
                if let Some(mut dispatched) = self.pending_event.take() {
                    if let Some(parsed) = id.flatten() {
                        match &mut dispatched {
                            Dispatched::Event { id, .. } | Dispatched::Reset { id } => {
                                *id = Some(parsed)
                            }
                        }
                    }
                    on_event(dispatched);
                }
            } else if let Some(data) = line.strip_prefix(b"data: ") {
                if let (Some(k), Some(t)) =
                    (number_after(data, b"\"k\":"), number_after(data, b"\"t\":"))
                {
                    let g = number_after(data, b"\"g\":").unwrap_or(0);
                    self.pending_event
                        .get_or_insert(Dispatched::Event { g, k, t, id: None });
                }
            } else if line == b"event: herald.reset" {
                self.pending_event = Some(Dispatched::Reset { id: None });
            } else if let Some(id) = line.strip_prefix(b"id: ") {
                self.pending_id = Some(String::from_utf8_lossy(id).into_owned());
            } else if let Some(retry) = line.strip_prefix(b"retry: ") {
                if let Some(ms) = std::str::from_utf8(retry).ok().and_then(|r| r.parse().ok()) {
                    self.retry_ms = ms;
                }
            }
            self.partial.clear();
            rest = &rest[at + 1..];
        }
        self.partial.extend_from_slice(rest);
    }
}

/// An SSE id as Herald writes it: `<epoch hex>-<sequence>`, or for a stream
/// following several targets `<epoch hex>-<newest>.<fingerprint>.<lag>…`
/// (one position per target); the epoch and the newest position.
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let head = id.split('.').next()?;
    let (epoch, seq) = head.rsplit_once('-')?;
    Some((u64::from_str_radix(epoch, 16).ok()?, seq.parse().ok()?))
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
    fn ids_with_one_position_per_target_read_as_their_newest_position() {
        assert_eq!(parse_id("1f-42"), Some((0x1f, 42)));
        assert_eq!(parse_id("1f-42.ab12.0.7"), Some((0x1f, 42)));
        assert_eq!(parse_id("nonsense"), None);
    }

    #[test]
    fn the_scanner_reads_numbers_from_data_lines_split_across_chunks() {
        let mut scanner = Scanner::default();
        let mut seen = Vec::new();
        scanner.feed(b"id: 1-1\ndata: {\"k\":1,\"p\":\"x\",\"t\":5", |d| {
            seen.push(d)
        });
        scanner.feed(b"00}\n\n: hb\n\ndata: {\"k\":2,\"t\":7}\n\n", |d| {
            seen.push(d)
        });
        assert_eq!(
            seen,
            vec![
                Dispatched::Event {
                    g: 0,
                    k: 1,
                    t: 500,
                    id: Some((1, 1))
                },
                Dispatched::Event {
                    g: 0,
                    k: 2,
                    t: 7,
                    id: None
                }
            ]
        );
        assert_eq!(scanner.last_id, "1-1");
        scanner.feed(
            b"retry: 2500\n\nid: 9-3\ndata: {\"k\":3,\"t\":1}\n\n",
            |_| {},
        );
        assert_eq!((scanner.retry_ms, scanner.last_id.as_str()), (2500, "9-3"));
    }

    #[test]
    fn nchan_events_are_read_from_their_data_and_their_id_is_resent_as_it_came() {
        let mut scanner = Scanner::default();
        let mut seen = Vec::new();
        scanner.feed(
            b": hi\n\n:hb\n\nid: 1796200153:0\ndata: {\"g\":4,\"k\":1,\"t\":9,\"p\":\"\"}\n\n",
            |d| seen.push(d),
        );
        assert_eq!(
            seen,
            vec![Dispatched::Event {
                g: 4,
                k: 1,
                t: 9,
                id: None
            }],
            "the heartbeat comments are no events; nchan's id has no Herald position"
        );
        assert_eq!(scanner.last_id, "1796200153:0");
    }

    #[test]
    fn an_event_cut_before_its_blank_line_is_neither_counted_nor_resumed_from() {
        let mut scanner = Scanner::default();
        let mut seen = Vec::new();
        scanner.feed(
            b"id: 1-4\ndata: {\"k\":4,\"t\":1}\n\nid: 1-5\ndata: {\"k\":5,\"t\":1}\n",
            |d| seen.push(d),
        );
        // The connection ends here: event 5 never completed.
        assert_eq!(
            seen,
            vec![Dispatched::Event {
                g: 0,
                k: 4,
                t: 1,
                id: Some((1, 4))
            }]
        );
        assert_eq!(scanner.last_id, "1-4");
    }

    #[test]
    fn a_reset_is_handed_over_with_its_id_and_never_as_an_event() {
        let mut scanner = Scanner::default();
        let mut seen = Vec::new();
        scanner.feed(
            b"id: 7-80\nevent: herald.reset\ndata: {\"reason\":\"epoch_changed\"}\n\n\
              id: 7-81\ndata: {\"g\":3,\"k\":9,\"t\":1}\n\n",
            |d| seen.push(d),
        );
        assert_eq!(
            seen,
            vec![
                Dispatched::Reset { id: Some((7, 80)) },
                Dispatched::Event {
                    g: 3,
                    k: 9,
                    t: 1,
                    id: Some((7, 81))
                }
            ]
        );
        assert_eq!(scanner.last_id, "7-81");
    }

    fn stats(targets: &[usize]) -> ConnectionStats {
        ConnectionStats {
            targets: targets.iter().copied().map(TargetState::new).collect(),
            ..Default::default()
        }
    }

    fn event(g: u64, k: u64, seq: u64) -> Dispatched {
        Dispatched::Event {
            g,
            k,
            t: 1,
            id: Some((7, seq)),
        }
    }

    #[test]
    fn a_targets_event_behind_another_targets_later_one_is_counted_out_of_order() {
        let histogram = Mutex::new(Histogram::new(3).expect("histogram"));
        let stats = stats(&[3, 10]);
        stats.record(event(3, 1, 5), &histogram);
        stats.record(event(10, 1, 8), &histogram);
        stats.record(event(3, 2, 7), &histogram);
        assert_eq!(stats.misordered.load(Ordering::Relaxed), 1);
        assert_eq!(
            stats.jumped.load(Ordering::Relaxed),
            0,
            "each target is in order"
        );
        stats.record(event(10, 2, 9), &histogram);
        assert_eq!(stats.misordered.load(Ordering::Relaxed), 1);
        assert_eq!(stats.received.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn a_quiet_targets_events_keep_their_longest_delay_apart() {
        let histogram = Mutex::new(Histogram::new(3).expect("histogram"));
        let stats = ConnectionStats {
            targets: vec![
                TargetState::new(3),
                TargetState {
                    quiet: true,
                    ..TargetState::new(10)
                },
            ],
            ..Default::default()
        };
        let at = |g, k, ago_us: u64| Dispatched::Event {
            g,
            k,
            t: now_micros() - ago_us,
            id: None,
        };
        stats.record(at(3, 1, 9_000_000), &histogram);
        stats.record(at(10, 1, 2_000_000), &histogram);
        stats.record(at(10, 2, 1_000_000), &histogram);
        assert_eq!(stats.quiet_received.load(Ordering::Relaxed), 2);
        let max = stats.quiet_max_delay_us.load(Ordering::Relaxed);
        assert!(
            (2_000_000..9_000_000).contains(&max),
            "the busy target's delay is not a quiet one's: {max}"
        );
    }

    #[test]
    fn an_event_for_a_target_not_followed_is_counted_and_not_received() {
        let histogram = Mutex::new(Histogram::new(3).expect("histogram"));
        let stats = stats(&[3, 10]);
        stats.record(event(4, 1, 5), &histogram);
        assert_eq!(stats.foreign.load(Ordering::Relaxed), 1);
        assert_eq!(stats.received.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_reset_excuses_the_gap_of_every_target_once() {
        let histogram = Mutex::new(Histogram::new(3).expect("histogram"));
        let stats = stats(&[3, 10]);
        stats.record(event(3, 1, 5), &histogram);
        stats.record(event(10, 1, 6), &histogram);
        stats.record(Dispatched::Reset { id: Some((8, 2)) }, &histogram);
        stats.record(
            Dispatched::Event {
                g: 3,
                k: 4,
                t: 1,
                id: Some((8, 3)),
            },
            &histogram,
        );
        stats.record(
            Dispatched::Event {
                g: 10,
                k: 3,
                t: 1,
                id: Some((8, 4)),
            },
            &histogram,
        );
        assert_eq!(stats.skipped_after_reset.load(Ordering::Relaxed), 2 + 1);
        assert_eq!(stats.jumped.load(Ordering::Relaxed), 0);
        assert_eq!(
            stats.misordered.load(Ordering::Relaxed),
            0,
            "a new epoch starts over"
        );
    }
}
