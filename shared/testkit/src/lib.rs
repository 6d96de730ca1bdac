//! Test harness for Herald: real nodes, real sockets, real SSE parsing.
//!
//! - [`EdgeNode`]: an edge node running in this process on an ephemeral port,
//!   stopped (gracefully) when dropped;
//! - [`subscriber_token`], [`publisher_token`]: tokens signed with [`SECRET`];
//! - [`SseClient`]: an HTTP client that reads a stream with the spec-conformant
//!   parser from `herald-protocol`;
//! - [`publish`]: `POST /v1/publish`;
//! - [`wait_until`]: poll a condition with a deadline instead of sleeping;
//! - [`proxy::TcpProxy`]: a loopback TCP proxy that can cut every connection;
//! - [`nats::NatsServer`], [`nats::NatsCluster`]: real nats-server processes;
//! - [`process::EdgeProcess`]: the real `herald-edge` binary, for kill tests;
//! - [`otlp::Collector`]: an OTLP/HTTP receiver decoding the official protobuf.

pub mod nats;
pub mod otlp;
pub mod process;
pub mod proxy;
pub mod resuming;
pub mod udp_relay;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::StreamExt;
use herald_config::{Secret, Settings};
use herald_edge::{Claims, Node, NodeHandle, PublishClaim, expiry_in, mint};
use herald_protocol::sse::{Item, ParsedEvent, Parser};
use tokio_util::sync::CancellationToken;

/// The HS256 secret every test node and token uses.
pub const SECRET: &str = "herald-test-secret-0123456789abcdef";

/// The gossip key every test node seals its gossip with, so cluster tests
/// run the sealed transport production runs (a test that wants plain gossip
/// sets `gossip.secret = None`).
pub const GOSSIP_KEY: &str = "qnRC2g8yDIrQV3ZBW6v1n3cW0AFd8E0wq9fI3Kx2TQ4=";

/// How long a test waits for something that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Settings for a test node: loopback, ephemeral ports (public and admin),
/// the test secret.
pub fn test_settings() -> Settings {
    let mut settings = Settings::default();
    settings.http.listen = "127.0.0.1:0".into();
    settings.admin.listen = "127.0.0.1:0".into();
    settings.auth.hs256_secret = Some(Secret::new(SECRET));
    settings.node.id = Some("test-node".into());
    settings.http.shutdown_grace_ms = 2_000;
    settings.stream.drain_ms = 100;
    // One node per test unless a test builds a cluster; port 0 when it does.
    settings.gossip.enabled = false;
    settings.gossip.listen = "127.0.0.1:0".into();
    settings.gossip.secret = Some(Secret::new(GOSSIP_KEY));
    settings
}

/// An edge node running in this process.
#[derive(Debug)]
pub struct EdgeNode {
    /// Where it listens: streams, publish, presence.
    pub addr: SocketAddr,
    /// Its admin listener: `/metrics`, `/v1/cluster`, `/healthz`, `/readyz`.
    pub admin_addr: SocketAddr,
    /// Its registry and metrics.
    pub handle: NodeHandle,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl EdgeNode {
    /// Starts a node with [`test_settings`] changed by `configure`.
    pub async fn start(configure: impl FnOnce(&mut Settings)) -> anyhow::Result<EdgeNode> {
        let mut settings = test_settings();
        configure(&mut settings);
        settings.validate()?;
        let node = Node::bind(settings).await?;
        let addr = node.local_addr();
        let admin_addr = node.admin_addr();
        let handle = node.handle();
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let task = tokio::spawn(async move {
            if let Err(err) = node.run(stop.cancelled_owned()).await {
                eprintln!("test node failed: {err}");
            }
        });
        Ok(EdgeNode {
            addr,
            admin_addr,
            handle,
            shutdown,
            task: Some(task),
        })
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `http://<admin_addr><path>`: the admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    /// Shuts the node down and waits until it has stopped.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task)
                .await
                .context("node did not stop in time")??;
        }
        Ok(())
    }
}

impl Drop for EdgeNode {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A subscriber token for `user` granting `topics`, valid for an hour.
pub fn subscriber_token(user: &str, topics: &[&str]) -> String {
    token(Claims {
        sub: Some(user.into()),
        topics: topics.iter().map(|t| t.to_string()).collect(),
        exp: expiry_in(Duration::from_secs(3600)),
        ..Default::default()
    })
}

/// The `sub` of [`publisher_token`].
pub const TEST_PUBLISHER: &str = "herald-testkit";

/// A publisher credential for any target, valid for an hour, named
/// [`TEST_PUBLISHER`]. The name makes every credential this returns one
/// publisher: a `msg_id` deduplicates per publisher, and a token without `sub`
/// is a publisher of its own, so two calls a second apart (different `exp`)
/// would otherwise not deduplicate each other's retries.
pub fn publisher_token() -> String {
    token(Claims {
        sub: Some(TEST_PUBLISHER.into()),
        herald_publish: Some(PublishClaim::All(true)),
        exp: expiry_in(Duration::from_secs(3600)),
        ..Default::default()
    })
}

/// Signs arbitrary claims with [`SECRET`].
pub fn token(claims: Claims) -> String {
    mint(SECRET, &claims).expect("HS256 signing with a static secret cannot fail")
}

/// `POST /v1/publish` with a publisher credential; returns status and JSON body.
pub async fn publish(
    node: &EdgeNode,
    body: serde_json::Value,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let response = reqwest::Client::new()
        .post(node.url("/v1/publish"))
        .bearer_auth(publisher_token())
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await?;
    let status = response.status().as_u16();
    let json = serde_json::from_slice(&response.bytes().await?)?;
    Ok((status, json))
}

/// Publishes `data` to a user and returns the event's SSE id.
pub async fn publish_to_user(node: &EdgeNode, user: &str, data: &str) -> anyhow::Result<String> {
    let (status, body) = publish(node, serde_json::json!({"user": user, "data": data})).await?;
    if status != 200 {
        bail!("publish answered {status}: {body}");
    }
    body["id"]
        .as_str()
        .map(str::to_owned)
        .context("publish answer has no id")
}

/// A real HTTP client reading one SSE stream.
pub struct SseClient {
    /// Response status.
    pub status: u16,
    /// Response headers.
    pub headers: reqwest::header::HeaderMap,
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    parser: Parser,
    pending: std::collections::VecDeque<Item>,
    ended: bool,
}

impl std::fmt::Debug for SseClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseClient")
            .field("status", &self.status)
            .field("last_event_id", &self.parser.last_event_id())
            .finish_non_exhaustive()
    }
}

impl SseClient {
    /// Opens `url` with extra request headers (and no timeout on the body).
    pub async fn connect(url: &str, headers: &[(&str, &str)]) -> anyhow::Result<SseClient> {
        let mut request = reqwest::Client::new().get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await?;
        Ok(SseClient {
            status: response.status().as_u16(),
            headers: response.headers().clone(),
            body: Box::pin(response.bytes_stream()),
            parser: Parser::new(),
            pending: Default::default(),
            ended: false,
        })
    }

    /// Opens the stream of `user` on `node` with the token in the header.
    pub async fn open(node: &EdgeNode, user: &str) -> anyhow::Result<SseClient> {
        let token = subscriber_token(user, &[]);
        let client = Self::connect(
            &node.url("/v1/stream"),
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await?;
        if client.status != 200 {
            bail!("stream answered {}", client.status);
        }
        Ok(client)
    }

    /// Opens the streams of `count` users (`user-0`, `user-1`, …) on `node`,
    /// each read past its first item (the stream is registered): streams a
    /// draining node has to end.
    pub async fn open_many(node: &EdgeNode, count: usize) -> anyhow::Result<Vec<SseClient>> {
        let mut open = Vec::with_capacity(count);
        for i in 0..count {
            let mut client = Self::open(node, &format!("user-{i}")).await?;
            client.next_item(PATIENCE).await?;
            open.push(client);
        }
        Ok(open)
    }

    /// The last event id seen, as a browser would resend it.
    pub fn last_event_id(&self) -> &str {
        self.parser.last_event_id()
    }

    /// The next item (event, comment or retry), or `None` when the stream ended.
    pub async fn next_item(&mut self, timeout: Duration) -> anyhow::Result<Option<Item>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(item) = self.pending.pop_front() {
                return Ok(Some(item));
            }
            if self.ended {
                return Ok(None);
            }
            match tokio::time::timeout_at(deadline, self.body.next()).await {
                Err(_) => bail!("no SSE item within {timeout:?}"),
                Ok(None) => self.ended = true,
                Ok(Some(chunk)) => {
                    let chunk = chunk?;
                    self.pending.extend(self.parser.feed(&chunk));
                }
            }
        }
    }

    /// The next event, skipping comments and retry hints; fails if the stream ends.
    pub async fn next_event(&mut self, timeout: Duration) -> anyhow::Result<ParsedEvent> {
        loop {
            match self.next_item(timeout).await? {
                Some(Item::Event(event)) => return Ok(event),
                Some(_) => {}
                None => bail!("stream ended while an event was expected"),
            }
        }
    }

    /// The next `count` events.
    pub async fn events(&mut self, count: usize) -> anyhow::Result<Vec<ParsedEvent>> {
        let mut events = Vec::with_capacity(count);
        for _ in 0..count {
            events.push(self.next_event(PATIENCE).await?);
        }
        Ok(events)
    }

    /// Reads until the stream ends, returning every item read.
    pub async fn until_end(&mut self, timeout: Duration) -> anyhow::Result<Vec<Item>> {
        let mut items = Vec::new();
        while let Some(item) = self.next_item(timeout).await? {
            items.push(item);
        }
        Ok(items)
    }
}

/// Polls `condition` every 10 ms until it holds or `timeout` passes.
pub async fn wait_until(
    what: &str,
    timeout: Duration,
    mut condition: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition() {
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
