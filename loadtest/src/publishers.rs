//! The publishing side: paced events over `POST /v1/publish`, or straight into
//! NATS JetStream as any application would (`--nats`), each target's events
//! numbered in order by the one publisher that owns that target.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use herald_edge::{Claims, PublishClaim, expiry_in, mint};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::options::{Api, Options, nchan_channel};
use crate::subscribers::now_micros;

/// What was published, per target.
#[derive(Debug)]
pub struct Published {
    per_target: Vec<AtomicU64>,
    /// Publish requests that failed.
    pub errors: AtomicU64,
    /// Events (through NATS) whose first acknowledgement failed, so they were
    /// published again with the same `Nats-Msg-Id`.
    pub retried: AtomicU64,
    /// Acknowledgements with `duplicate: true`: JetStream recognised the
    /// `Nats-Msg-Id` and stored nothing.
    pub duplicate_acks: AtomicU64,
    /// Longest time from an event's first publish to its stored
    /// acknowledgement, microseconds (how long publishing stalled in a fault).
    pub max_stall_us: AtomicU64,
    /// Wall time of the paced publishing phase, seconds (as f64 bits).
    secs: AtomicU64,
}

impl Published {
    /// Nothing published yet to `targets` targets.
    pub fn new(targets: usize) -> Self {
        Published {
            per_target: (0..targets).map(|_| AtomicU64::new(0)).collect(),
            errors: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            duplicate_acks: AtomicU64::new(0),
            max_stall_us: AtomicU64::new(0),
            secs: AtomicU64::new(0),
        }
    }

    /// Events published to `target` (its highest sequence).
    pub fn sent(&self, target: usize) -> u64 {
        self.per_target
            .get(target)
            .map_or(0, |n| n.load(Ordering::Relaxed))
    }

    /// Events published in total.
    pub fn total(&self) -> u64 {
        self.per_target
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .sum()
    }

    /// Wall time of the paced publishing phase, seconds.
    pub fn secs(&self) -> f64 {
        f64::from_bits(self.secs.load(Ordering::Relaxed))
    }
}

/// A subscriber token for `user`, following `topic` if given.
pub fn subscriber_token(secret: &str, user: &str, topic: Option<&str>) -> anyhow::Result<String> {
    let claims = Claims {
        sub: Some(user.to_owned()),
        topics: topic.map(|t| vec![t.to_owned()]).unwrap_or_default(),
        exp: expiry_in(Duration::from_secs(24 * 3600)),
        ..Default::default()
    };
    Ok(mint(secret, &claims)?)
}

/// The token publishers send (none for nchan, which has no authentication).
fn publisher_token(options: &Options) -> anyhow::Result<Option<String>> {
    if options.api == Api::Nchan {
        return Ok(None);
    }
    Ok(Some(mint(
        &options.secret,
        &Claims {
            herald_publish: Some(PublishClaim::All(true)),
            exp: expiry_in(Duration::from_secs(24 * 3600)),
            ..Default::default()
        },
    )?))
}

fn publish_target(options: &Options) -> anyhow::Result<SocketAddr> {
    options.urls[0]
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .context("--url: expected http://IP:PORT")
}

/// The next event for `target`, numbered `k`: its data (carrying the target,
/// its sequence and the publish time) and whom it is for.
struct Outgoing<'a> {
    topic: Option<&'a str>,
    target: usize,
    k: u64,
    data: String,
}

fn event<'a>(topic: Option<&'a str>, target: usize, k: u64, padding: &str) -> Outgoing<'a> {
    Outgoing {
        topic,
        target,
        k,
        data: format!(
            r#"{{"g":{target},"k":{k},"t":{},"p":"{padding}"}}"#,
            now_micros()
        ),
    }
}

impl Outgoing<'_> {
    /// The HTTP request's path and body: Herald's `POST /v1/publish` with a
    /// JSON body naming the target, or nchan's `POST /pub/<channel>` whose
    /// body is the message.
    fn http_request(&self, api: Api) -> (String, String) {
        match api {
            Api::Herald => ("/v1/publish".to_owned(), self.http_body()),
            Api::Nchan => (
                format!("/pub/{}", nchan_channel(self.topic, self.target)),
                self.data.clone(),
            ),
        }
    }

    /// The `POST /v1/publish` body.
    fn http_body(&self) -> String {
        let msg_id = self.msg_id();
        match self.topic {
            Some(topic) => {
                format!(
                    r#"{{"topic":"{topic}","data":{},"msg_id":"{msg_id}"}}"#,
                    self.data
                )
            }
            None => format!(
                r#"{{"user":"{}","data":{},"msg_id":"{msg_id}"}}"#,
                Options::user_name(self.target),
                self.data
            ),
        }
    }

    /// One id per (run, target, sequence): a publish retried after a failure
    /// that was in fact stored is deduplicated by JetStream, as a careful
    /// application's would be, and a later run against the same stream (its
    /// sequences start at 1 again) is not mistaken for retries.
    fn msg_id(&self) -> String {
        format!("lt-{:08x}-{}-{}", run_id(), self.target, self.k)
    }

    /// The NATS subject under `prefix` (load-test ids are plain tokens).
    fn subject(&self, prefix: &str) -> String {
        match self.topic {
            Some(topic) => format!("{prefix}.topic.{topic}"),
            None => format!("{prefix}.user.{}", Options::user_name(self.target)),
        }
    }
}

/// A random number drawn once per run, part of every `Nats-Msg-Id`.
fn run_id() -> u32 {
    static RUN: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *RUN.get_or_init(|| fastrand::u32(..))
}

/// How events leave the generator.
enum Publisher {
    Http(HttpPublisher),
    Nats(Box<NatsPublisher>),
}

impl Publisher {
    async fn connect(
        options: &Options,
        token: Option<&str>,
        published: &Arc<Published>,
    ) -> anyhow::Result<Self> {
        match &options.nats {
            Some(url) => Ok(Publisher::Nats(Box::new(
                NatsPublisher::connect(url, options, Arc::clone(published)).await?,
            ))),
            None => Ok(Publisher::Http(
                HttpPublisher::connect(
                    publish_target(options)?,
                    token.map(str::to_owned),
                    options.api,
                )
                .await?,
            )),
        }
    }

    async fn publish(&mut self, event: Outgoing<'_>) -> anyhow::Result<()> {
        match self {
            Publisher::Http(http) => {
                let (path, body) = event.http_request(http.api);
                http.publish(&path, body).await
            }
            Publisher::Nats(nats) => nats.publish(&event).await,
        }
    }

    /// Waits for every acknowledgement still outstanding.
    async fn finish(&mut self) -> anyhow::Result<()> {
        match self {
            Publisher::Http(_) => Ok(()),
            Publisher::Nats(nats) => nats.finish().await,
        }
    }
}

/// A JetStream publisher with up to [`NatsPublisher::WINDOW`] acknowledgements
/// in flight, at most one per target (so a retried event is never overtaken by
/// a later one for the same user or topic). An event whose
/// acknowledgement fails (a server restarting, a leader election) is published
/// again with the same `Nats-Msg-Id` until JetStream stores it, as a careful
/// application does: an event counted as published is an event in the stream.
/// With `--publish-twice`, every stored event is sent once more with the same
/// id, as a publisher that retries after a lost acknowledgement would.
struct NatsPublisher {
    jetstream: async_nats::jetstream::Context,
    prefix: String,
    publish_twice: bool,
    published: Arc<Published>,
    in_flight: std::collections::VecDeque<InFlight>,
}

/// One unacknowledged publish and what it takes to send it again.
struct InFlight {
    ack: async_nats::jetstream::context::PublishAckFuture,
    subject: String,
    msg_id: String,
    payload: Bytes,
    first_sent: Instant,
}

impl NatsPublisher {
    const WINDOW: usize = 256;
    /// How long an acknowledgement may take, counted from its send.
    /// async-nats starts its own 5 s when the acknowledgement is first
    /// awaited, so one that waited in the window behind others would get a
    /// fresh 5 s each: after every server restarted at once, the window's
    /// acknowledgements lost with the old connection were worked off one
    /// timeout at a time (about one event every 5 s per publisher, for up
    /// to two minutes).
    const ACK_WAIT: Duration = Duration::from_secs(5);
    /// Attempts to store one event before giving up (about 15 s).
    const ATTEMPTS: u32 = 60;

    async fn connect(
        url: &str,
        options: &Options,
        published: Arc<Published>,
    ) -> anyhow::Result<Self> {
        // Several servers, comma-separated, like `nats.url`.
        let servers: Vec<&str> = url.split(',').map(str::trim).collect();
        let client = async_nats::connect(servers)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        Ok(NatsPublisher {
            jetstream: async_nats::jetstream::new(client),
            prefix: options.nats_prefix.clone(),
            publish_twice: options.publish_twice,
            published,
            in_flight: Default::default(),
        })
    }

    async fn send(
        &self,
        subject: &str,
        msg_id: &str,
        payload: &Bytes,
    ) -> anyhow::Result<async_nats::jetstream::context::PublishAckFuture> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", msg_id);
        Ok(self
            .jetstream
            .publish_with_headers(subject.to_owned(), headers, payload.clone())
            .await?)
    }

    async fn publish(&mut self, event: &Outgoing<'_>) -> anyhow::Result<()> {
        let subject = event.subject(&self.prefix);
        // At most one unacknowledged event per target: if a publish has to be
        // retried, nothing later for the same target may overtake it.
        while self.in_flight.iter().any(|f| f.subject == subject) {
            if let Some(in_flight) = self.in_flight.pop_front() {
                self.settle(in_flight).await?;
            }
        }
        let msg_id = event.msg_id();
        let payload = Bytes::from(event.data.clone());
        let ack = self.send(&subject, &msg_id, &payload).await?;
        self.in_flight.push_back(InFlight {
            ack,
            subject,
            msg_id,
            payload,
            first_sent: Instant::now(),
        });
        while self.in_flight.len() > Self::WINDOW {
            if let Some(in_flight) = self.in_flight.pop_front() {
                self.settle(in_flight).await?;
            }
        }
        Ok(())
    }

    /// Waits for one acknowledgement, publishing the event again (same id)
    /// until it is stored.
    async fn settle(&self, in_flight: InFlight) -> anyhow::Result<()> {
        let InFlight {
            mut ack,
            subject,
            msg_id,
            payload,
            first_sent,
        } = in_flight;
        let mut attempt = 1;
        let mut deadline = first_sent + Self::ACK_WAIT;
        loop {
            let answer = tokio::time::timeout_at(
                tokio::time::Instant::from_std(deadline),
                std::future::IntoFuture::into_future(ack),
            )
            .await;
            let err = match answer {
                Ok(Ok(stored)) => {
                    self.stored(stored.duplicate, first_sent);
                    return self.send_again(&subject, &msg_id, &payload).await;
                }
                Ok(Err(err)) => anyhow::Error::from(err),
                Err(_) => {
                    anyhow::anyhow!("no acknowledgement within {:?} of the send", Self::ACK_WAIT)
                }
            };
            if attempt >= Self::ATTEMPTS {
                return Err(err);
            }
            if attempt == 1 {
                self.published.retried.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "publish of {msg_id} not acknowledged ({err}); retrying with the same Nats-Msg-Id"
                );
            }
            // Send it again, waiting out a connection that is down.
            ack = loop {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(250)).await;
                match self.send(&subject, &msg_id, &payload).await {
                    Ok(ack) => break ack,
                    Err(err) if attempt >= Self::ATTEMPTS => return Err(err),
                    Err(_) => {}
                }
            };
            deadline = Instant::now() + Self::ACK_WAIT;
        }
    }

    /// Counts one stored acknowledgement.
    fn stored(&self, duplicate: bool, first_sent: Instant) {
        if duplicate {
            self.published
                .duplicate_acks
                .fetch_add(1, Ordering::Relaxed);
        }
        let stall = first_sent.elapsed().as_micros() as u64;
        self.published
            .max_stall_us
            .fetch_max(stall, Ordering::Relaxed);
    }

    /// With `--publish-twice`: the same event once more, same id, after it
    /// was stored. JetStream must answer `duplicate: true` and store nothing.
    async fn send_again(&self, subject: &str, msg_id: &str, payload: &Bytes) -> anyhow::Result<()> {
        if !self.publish_twice {
            return Ok(());
        }
        let ack = self.send(subject, msg_id, payload).await?.await?;
        if ack.duplicate {
            self.published
                .duplicate_acks
                .fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn finish(&mut self) -> anyhow::Result<()> {
        while let Some(in_flight) = self.in_flight.pop_front() {
            self.settle(in_flight).await?;
        }
        Ok(())
    }
}

/// Publishes `count` events to every target as fast as the publishers go (the
/// events clients are owed while they are away).
pub async fn burst(
    options: &Options,
    published: &Arc<Published>,
    count: u64,
) -> anyhow::Result<()> {
    let token = publisher_token(options)?;
    let targets = published.per_target.len();
    let mut tasks = Vec::new();
    for index in 0..options.publishers {
        let published = Arc::clone(published);
        let token = token.clone();
        let options = options.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = Publisher::connect(&options, token.as_deref(), &published).await?;
            for target in (index..targets).step_by(options.publishers) {
                for _ in 0..count {
                    let k = published.per_target[target].load(Ordering::Relaxed) + 1;
                    client
                        .publish(event(options.topic_of(target), target, k, ""))
                        .await?;
                    published.per_target[target].store(k, Ordering::Relaxed);
                }
            }
            client.finish().await
        }));
    }
    for task in tasks {
        task.await.context("publisher panicked")??;
    }
    Ok(())
}

/// Publishes at `options.rate` for `options.duration_secs`.
pub async fn run(options: &Options, published: &Arc<Published>) -> anyhow::Result<()> {
    if options.duration_secs == 0 || options.rate == 0 {
        return Ok(());
    }
    let token = publisher_token(options)?;
    let targets = published.per_target.len();
    eprintln!(
        "[{}] publishing {} events/s for {}s with {} publisher(s) {}",
        options.label,
        options.rate,
        options.duration_secs,
        options.publishers,
        match &options.nats {
            Some(url) => format!("into NATS JetStream at {url}"),
            None => "over HTTP".to_owned(),
        }
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs(options.duration_secs);
    let per_publisher = Duration::from_secs_f64(options.publishers as f64 / options.rate as f64);
    let padding = "x".repeat(options.payload_bytes);
    let mut tasks = Vec::new();
    for index in 0..options.publishers {
        let published = Arc::clone(published);
        let token = token.clone();
        let padding = padding.clone();
        let options = options.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = Publisher::connect(&options, token.as_deref(), &published).await?;
            let (quiet, owned): (Vec<usize>, Vec<usize>) = (index..targets)
                .step_by(options.publishers)
                .partition(|&target| options.is_quiet(target));
            let mut quiet = QuietSchedule::new(&options, started, quiet);
            let mut ticker = tokio::time::interval(per_publisher);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while Instant::now() < deadline {
                ticker.tick().await;
                // A quiet target whose turn came takes this tick's event.
                let (target, events) = match quiet.due(Instant::now()) {
                    Some(target) => (target, options.quiet_burst),
                    None if owned.is_empty() => continue,
                    None if owned.len() == 1 => (owned[0], 1),
                    None => (owned[fastrand::usize(..owned.len())], 1),
                };
                for _ in 0..events {
                    let k = published.per_target[target].load(Ordering::Relaxed) + 1;
                    let outgoing = event(options.topic_of(target), target, k, &padding);
                    match client.publish(outgoing).await {
                        Ok(()) => published.per_target[target].store(k, Ordering::Relaxed),
                        Err(err) => {
                            if published.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                eprintln!("publish failed: {err:#}");
                            }
                            client =
                                Publisher::connect(&options, token.as_deref(), &published).await?;
                        }
                    }
                }
            }
            client.finish().await
        }));
    }
    for task in tasks {
        task.await.context("publisher panicked")??;
    }
    published
        .secs
        .store(started.elapsed().as_secs_f64().to_bits(), Ordering::Relaxed);
    Ok(())
}

/// When each quiet target (`--quiet-users`) a publisher owns gets its next
/// events (`quiet_burst` of them back to back): every `quiet_every_secs`, the quiet users' turns spread evenly
/// over that period so they do not all come at once.
struct QuietSchedule {
    every: Duration,
    /// (next turn, target), one per quiet target owned.
    turns: Vec<(Instant, usize)>,
}

impl QuietSchedule {
    fn new(options: &Options, started: Instant, targets: Vec<usize>) -> Self {
        let every = Duration::from_secs(options.quiet_every_secs);
        let first_quiet = options.users - options.quiet_users;
        let turns = targets
            .into_iter()
            .map(|target| {
                let place = (target - first_quiet) as f64 / options.quiet_users.max(1) as f64;
                (started + every.mul_f64(place), target)
            })
            .collect();
        QuietSchedule { every, turns }
    }

    /// A quiet target whose turn has come at `now` (its next turn moves one
    /// period on), if any.
    fn due(&mut self, now: Instant) -> Option<usize> {
        let turn = self.turns.iter_mut().find(|(at, _)| *at <= now)?;
        turn.0 += self.every;
        Some(turn.1)
    }
}

/// One keep-alive HTTP/1.1 connection used for publishing.
struct HttpPublisher {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    server: SocketAddr,
    /// The bearer token, for servers that ask for one.
    token: Option<String>,
    api: Api,
}

impl HttpPublisher {
    async fn connect(server: SocketAddr, token: Option<String>, api: Api) -> anyhow::Result<Self> {
        let tcp = TcpStream::connect(server).await?;
        tcp.set_nodelay(true)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(connection);
        Ok(HttpPublisher {
            sender,
            server,
            token,
            api,
        })
    }

    /// Sends one publish request; any 2xx answer means stored (Herald
    /// answers 200, nchan 201 or 202 depending on whether the channel has
    /// subscribers).
    async fn publish(&mut self, path: &str, body: String) -> anyhow::Result<()> {
        let mut request = hyper::Request::post(path)
            .header("host", self.server.to_string())
            .header("content-type", "application/json");
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request.body(Full::new(Bytes::from(body)))?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("status {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(())
    }
}
