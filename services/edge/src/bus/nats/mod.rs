//! The NATS JetStream bus: many edge nodes, one durable, ordered history.
//!
//! - **Storage.** Every event is a message on `<prefix>.user.<token>` or
//!   `<prefix>.topic.<token>` in one stream (`HERALD`); the stream sequence is
//!   the SSE id's sequence, and the stream's creation time is the id's epoch, so
//!   every node computes the same ids and a recreated stream is recognised.
//! - **Live path.** The stream RePublishes each stored message under
//!   `<live_prefix>.…` with `Nats-Sequence` and `Nats-Last-Sequence` (the
//!   previous sequence on the same subject). A node subscribes (core NATS) only
//!   to the targets it holds connections for: interest-based fan-out, no
//!   firehose. One dispatcher hands every target's messages over in stream
//!   order ([`live`]); the republished copy is not durable, so each followed
//!   target keeps the last sequence it delivered: a message at or below it is
//!   a duplicate and dropped; a `Nats-Last-Sequence` above it means a live
//!   message went missing, and the gap is filled from the stream first.
//! - **Outages.** When the connection drops, streams stay open and `/readyz`
//!   turns unready; when it is back, every followed target fills its gap from
//!   the stream.
//! - **Replay.** The targets' messages after the client's position are read from
//!   the stream, merged in sequence order. History that is gone (older than
//!   the stream's first message, evicted by the per-subject limit, another
//!   epoch) is reported, never skipped.
//! - **Reads go to the stream leader** (`STREAM.MSG.GET`), never Direct Get:
//!   any replica answers a Direct Get, and one that has not caught up answers
//!   "nothing after" for events the leader already acknowledged and
//!   republished. A replay or gap fill read that way skips them silently (the
//!   one-hour soak lost an event so, in a reconnect storm after a leader
//!   kill).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::{self, stream};
use async_nats::{ConnectOptions, HeaderMap, ServerAddr};
use bytes::Bytes;
use futures_util::StreamExt;
use herald_config::{NatsSettings, NatsStorage};
use herald_protocol::{Epoch, EventId, EventType, Target, TraceParent};
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

mod history;
mod live;

use history::History;

use super::{
    Bus, Event, FollowState, Interest, LiveSink, LostReason, PublishError, PublishRequest, Receipt,
    Replay, ReplayError, check_position,
};
use crate::metrics::Metrics;
use crate::telemetry::Tracing;

/// Header carrying the SSE event type.
pub const EVENT_TYPE_HEADER: &str = "Herald-Event";

/// Oldest nats-server accepted: multi-subject filters and RePublish as Herald
/// uses them are reliable from 2.10 on.
const MIN_SERVER: (u64, u64) = (2, 10);

/// How long one JetStream API call may take.
const API_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the NATS bus could not start. Nothing was created or changed on the
/// server unless the error says so.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The server could not be reached or refused the credentials.
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect {
        /// The configured URL(s).
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// A settings value could not be used (bad URL, unreadable file).
    #[error("{key}: {reason}")]
    Setting {
        /// The settings key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The server is older than Herald supports.
    #[error("nats-server {found} is too old: Herald needs {}.{} or newer (2.10.23+ recommended)", MIN_SERVER.0, MIN_SERVER.1)]
    ServerTooOld {
        /// The server's version.
        found: String,
    },
    /// The stream exists with a configuration Herald cannot work with.
    #[error(
        "stream {stream} exists but its {field} is {found}, Herald needs {wanted}; \
         fix it or set nats.update_stream = true to let Herald update it"
    )]
    StreamConflict {
        /// The stream name.
        stream: String,
        /// The conflicting field.
        field: &'static str,
        /// What the server has.
        found: String,
        /// What Herald needs.
        wanted: String,
    },
    /// Creating, reading or updating the stream failed.
    #[error("stream {stream}: {reason}")]
    Stream {
        /// The stream name.
        stream: String,
        /// What went wrong.
        reason: String,
    },
}

/// The NATS JetStream bus.
pub struct NatsBus {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("stream", &self.shared.settings.stream)
            .field("epoch", &self.shared.epoch())
            .finish_non_exhaustive()
    }
}

struct Shared {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    stream: stream::Stream,
    settings: NatsSettings,
    epoch: AtomicU64,
    sink: Arc<dyn LiveSink>,
    metrics: Arc<Metrics>,
    tracing: Arc<Tracing>,
    /// The current follow of each followed target.
    followers: Mutex<HashMap<Target, Follower>>,
    next_follow: AtomicU64,
    /// The live dispatcher's commands (see [`live`]).
    live: mpsc::UnboundedSender<live::Command>,
    connected: Arc<AtomicBool>,
    /// Sent by the event callback after each (re)connection: wakes the
    /// history check and the dispatcher. Which connection is current is read
    /// from `statistics` (see [`Shared::connection`]).
    reconnects: watch::Sender<()>,
    statistics: Arc<async_nats::Statistics>,
    history: Arc<History>,
    /// Cancelled when the bus is dropped: ends the dispatcher and the
    /// history watch.
    stop: CancellationToken,
}

impl Drop for NatsBus {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

/// One follow of a target: its key, and what cancels its subscribing.
struct Follower {
    key: u64,
    stop: CancellationToken,
}

impl NatsBus {
    /// Connects, checks the server version, creates or validates the stream.
    pub async fn connect(
        settings: &NatsSettings,
        node_id: &str,
        sink: Arc<dyn LiveSink>,
        metrics: Arc<Metrics>,
        tracing: Arc<Tracing>,
    ) -> Result<NatsBus, NatsError> {
        let connected = Arc::new(AtomicBool::new(false));
        let (reconnects, _) = watch::channel(());
        let history = History::new();
        let lost = Arc::new(Notify::new());
        let client = connect(
            settings,
            node_id,
            Arc::clone(&connected),
            reconnects.clone(),
            Arc::clone(&history),
            Arc::clone(&lost),
            Arc::clone(&metrics),
        )
        .await?;
        connected.store(true, Ordering::SeqCst);
        metrics.nats_connected.set(1);
        check_version(&client.server_info().version)?;
        let jetstream = jetstream::new(client.clone());
        let (stream, epoch) = ensure_stream(&jetstream, settings).await?;
        tracing::info!(
            url = %settings.url,
            stream = %settings.stream,
            server = %client.server_info().version,
            epoch = %format!("{epoch:x}"),
            "connected to NATS JetStream"
        );
        let statistics = client.statistics();
        history.checked_up_to(statistics.connects.load(Ordering::Relaxed));
        let stop = CancellationToken::new();
        let (live, commands) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            client,
            jetstream,
            stream,
            settings: settings.clone(),
            epoch: AtomicU64::new(epoch),
            sink,
            metrics,
            tracing,
            followers: Mutex::new(HashMap::new()),
            next_follow: AtomicU64::new(1),
            live,
            connected,
            reconnects,
            statistics,
            history: Arc::clone(&history),
            stop: stop.clone(),
        });
        tokio::spawn(history::watch(
            Arc::downgrade(&shared),
            history,
            shared.reconnects.subscribe(),
            stop.clone(),
        ));
        // Before any target is followed: a leader elected from now on is heard.
        let leader_changes = shared
            .client
            .subscribe(format!(
                "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{}",
                settings.stream
            ))
            .await
            .map_err(|err| NatsError::Stream {
                stream: settings.stream.clone(),
                reason: format!("cannot subscribe to its leader advisories: {err}"),
            })?;
        let dispatcher =
            live::Dispatcher::new(Arc::clone(&shared), commands, lost, leader_changes, stop);
        tokio::spawn(tokio::task::unconstrained(dispatcher.run()));
        Ok(NatsBus { shared })
    }
}

async fn connect(
    settings: &NatsSettings,
    node_id: &str,
    connected: Arc<AtomicBool>,
    reconnects: watch::Sender<()>,
    history: Arc<History>,
    lost: Arc<Notify>,
    metrics: Arc<Metrics>,
) -> Result<async_nats::Client, NatsError> {
    let mut options = ConnectOptions::new()
        .name(node_id)
        .connection_timeout(Duration::from_millis(settings.connect_timeout_ms))
        .ping_interval(Duration::from_millis(settings.ping_interval_ms))
        .require_tls(settings.tls_required)
        .event_callback(move |event| {
            let connected = Arc::clone(&connected);
            let reconnects = reconnects.clone();
            let history = Arc::clone(&history);
            let lost = Arc::clone(&lost);
            let metrics = Arc::clone(&metrics);
            async move {
                match event {
                    async_nats::Event::Connected => {
                        connected.store(true, Ordering::SeqCst);
                        metrics.nats_connected.set(1);
                        reconnects.send_replace(());
                        tracing::info!("NATS connection (re)established");
                    }
                    async_nats::Event::Disconnected => {
                        history.disconnected();
                        connected.store(false, Ordering::SeqCst);
                        metrics.nats_connected.set(0);
                        tracing::warn!(
                            "NATS connection lost; streams stay open, gaps are filled on reconnect"
                        );
                    }
                    async_nats::Event::SlowConsumer(sid) => {
                        tracing::warn!(
                            subscription = sid,
                            "NATS dropped live messages for a slow subscription"
                        );
                        lost.notify_one();
                    }
                    other => tracing::debug!(event = %other, "NATS event"),
                }
            }
        });
    if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(token) = &settings.token {
        options = options.token(token.expose().to_owned());
    }
    if let Some(seed) = &settings.nkey_seed {
        options = options.nkey(seed.expose().to_owned());
    }
    if let Some(path) = &settings.creds_file {
        options = options
            .credentials_file(path)
            .await
            .map_err(|err| NatsError::Setting {
                key: "nats.creds_file",
                reason: err.to_string(),
            })?;
    }
    if let Some(path) = &settings.tls_ca_file {
        options = options.add_root_certificates(path.into());
    }
    let servers = settings
        .url
        .split(',')
        .map(|url| url.trim().parse::<ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| NatsError::Setting {
            key: "nats.url",
            reason: err.to_string(),
        })?;
    if settings.ignore_discovered_servers {
        options = options.ignore_discovered_servers();
    }
    options
        .connect(servers)
        .await
        .map_err(|err| NatsError::Connect {
            url: settings.url.clone(),
            reason: err.to_string(),
        })
}

/// Locks `mutex`, taking over the data of a holder that panicked (every
/// value guarded here stays valid between statements).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Refuses servers older than [`MIN_SERVER`].
fn check_version(version: &str) -> Result<(), NatsError> {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if found < MIN_SERVER {
        return Err(NatsError::ServerTooOld {
            found: version.to_owned(),
        });
    }
    Ok(())
}

/// The stream configuration Herald needs.
fn stream_config(settings: &NatsSettings) -> stream::Config {
    let prefix = &settings.subject_prefix;
    stream::Config {
        name: settings.stream.clone(),
        subjects: vec![format!("{prefix}.user.*"), format!("{prefix}.topic.*")],
        republish: Some(stream::Republish {
            source: format!("{prefix}.>"),
            destination: format!("{}.>", settings.live_prefix),
            headers_only: false,
        }),
        allow_direct: true,
        storage: match settings.storage {
            NatsStorage::File => stream::StorageType::File,
            NatsStorage::Memory => stream::StorageType::Memory,
        },
        num_replicas: settings.replicas,
        max_age: Duration::from_secs(settings.max_age_secs),
        max_bytes: settings.max_bytes,
        max_messages_per_subject: settings.max_messages_per_subject,
        duplicate_window: Duration::from_secs(settings.duplicate_window_secs),
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// The first field of `found` that conflicts with what Herald needs.
fn conflict(
    found: &stream::Config,
    wanted: &stream::Config,
) -> Option<(&'static str, String, String)> {
    let mut found_subjects = found.subjects.clone();
    let mut wanted_subjects = wanted.subjects.clone();
    found_subjects.sort();
    wanted_subjects.sort();
    if found_subjects != wanted_subjects {
        return Some((
            "subjects",
            format!("{found_subjects:?}"),
            format!("{wanted_subjects:?}"),
        ));
    }
    let republish = |r: &Option<stream::Republish>| {
        r.as_ref()
            .map(|r| {
                format!(
                    "{} -> {} (headers only: {})",
                    r.source, r.destination, r.headers_only
                )
            })
            .unwrap_or_else(|| "none".into())
    };
    if republish(&found.republish) != republish(&wanted.republish) {
        return Some((
            "republish",
            republish(&found.republish),
            republish(&wanted.republish),
        ));
    }
    None
}

/// Whether a stream creation failed only because the JetStream cluster is
/// still forming (see [`ensure_stream`]).
fn cluster_forming(kind: &jetstream::context::CreateStreamErrorKind) -> bool {
    use jetstream::context::CreateStreamErrorKind as Kind;
    match kind {
        Kind::TimedOut | Kind::JetStreamUnavailable => true,
        Kind::JetStream(err) => err.error_code() == jetstream::ErrorCode::CLUSTER_NO_PEERS,
        _ => false,
    }
}

/// Creates the stream if missing; validates (or updates) it if present.
async fn ensure_stream(
    jetstream: &jetstream::Context,
    settings: &NatsSettings,
) -> Result<(stream::Stream, u64), NatsError> {
    let failed = |reason: String| NatsError::Stream {
        stream: settings.stream.clone(),
        reason,
    };
    let wanted = stream_config(settings);
    // A JetStream cluster whose servers were started together times requests
    // out while it elects its leaders, and refuses to place a replicated
    // stream until its peers have joined ("no suitable peers"): retry those
    // for a bounded time instead of failing the start. Anything else fails
    // at once.
    let patience = Duration::from_millis(settings.connect_timeout_ms.max(1_000) * 6);
    let started = std::time::Instant::now();
    let mut stream = loop {
        match jetstream.get_or_create_stream(wanted.clone()).await {
            Ok(stream) => break stream,
            Err(err) if cluster_forming(&err.kind()) && started.elapsed() < patience => {
                tracing::warn!(stream = %settings.stream, error = %err, "JetStream not answering yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(err) => return Err(failed(err.to_string())),
        }
    };
    let info = stream
        .info()
        .await
        .map_err(|err| failed(err.to_string()))?
        .clone();
    if let Some((field, found, wanted_value)) = conflict(&info.config, &wanted) {
        if !settings.update_stream {
            return Err(NatsError::StreamConflict {
                stream: settings.stream.clone(),
                field,
                found,
                wanted: wanted_value,
            });
        }
        tracing::warn!(stream = %settings.stream, field, %found, "updating the stream's configuration (nats.update_stream = true)");
        let mut updated = info.config.clone();
        updated.subjects = wanted.subjects.clone();
        updated.republish = wanted.republish.clone();
        jetstream
            .update_stream(updated)
            .await
            .map_err(|err| failed(err.to_string()))?;
        stream = jetstream
            .get_stream(&settings.stream)
            .await
            .map_err(|err| failed(err.to_string()))?;
    }
    Ok((stream, epoch_of(&info)))
}

/// The epoch of a stream: its creation time, so every node agrees and a
/// recreated stream gets a new one — or, once a node found that acknowledged
/// events were lost, the epoch it wrote into the stream's metadata (see
/// [`history`]).
fn epoch_of(info: &stream::Info) -> u64 {
    info.config
        .metadata
        .get(history::EPOCH_METADATA)
        .and_then(|epoch| u64::from_str_radix(epoch, 16).ok())
        .unwrap_or_else(|| u64::try_from(info.created.unix_timestamp_nanos() / 1_000).unwrap_or(0))
}

impl Shared {
    fn epoch(&self) -> Epoch {
        Epoch(self.epoch.load(Ordering::Relaxed))
    }

    fn id(&self, seq: u64) -> EventId {
        EventId {
            epoch: self.epoch(),
            seq,
        }
    }

    /// The current connection, once its history has been checked; fails
    /// before: a position read from a history that went back would resume
    /// clients past events they never got.
    fn checked_connection(&self) -> Result<u64, ReplayError> {
        let connection = self.connection();
        if self.history.is_checked(connection) {
            Ok(connection)
        } else {
            Err(ReplayError(
                "the stream's history is being checked after a reconnect".into(),
            ))
        }
    }

    /// Fails unless the connection is still `connection`: what was read since
    /// may have been answered by a newer one, whose history is not checked.
    fn still_on(&self, connection: u64) -> Result<(), ReplayError> {
        if self.connection() == connection {
            Ok(())
        } else {
            Err(ReplayError(
                "the NATS connection changed while reading the stream".into(),
            ))
        }
    }

    /// Reads the stream's state, noticing a recreated stream (new epoch).
    async fn state(&self) -> Result<stream::State, ReplayError> {
        let stream = tokio::time::timeout(
            API_TIMEOUT,
            self.jetstream.get_stream(&self.settings.stream),
        )
        .await
        .map_err(|_| ReplayError("stream info timed out".into()))?
        .map_err(|err| ReplayError(err.to_string()))?;
        let info = stream.cached_info();
        self.history.seen(info.state.last_sequence);
        let epoch = epoch_of(info);
        if self.epoch.swap(epoch, Ordering::Relaxed) != epoch {
            tracing::warn!(stream = %self.settings.stream, epoch = %format!("{epoch:x}"), "the stream was recreated: old ids now get herald.reset");
        }
        Ok(info.state.clone())
    }

    /// Validates a stored or republished message into an event; a bad one is
    /// counted, logged and dropped.
    fn decode(
        &self,
        subject: &str,
        seq: u64,
        headers: Option<&HeaderMap>,
        payload: &Bytes,
        published_at: SystemTime,
    ) -> Option<Event> {
        let header = |name: &str| headers.and_then(|h| h.get(name)).map(|v| v.as_str());
        let refuse = |reason: &str| {
            self.metrics.bus_bad_events.inc();
            tracing::warn!(%subject, seq, reason, "dropping an event that cannot be delivered");
            None
        };
        let Ok(target) = Target::from_subject(&self.settings.subject_prefix, subject) else {
            return refuse("subject does not decode to a user or topic");
        };
        if payload.len() > self.settings.max_event_bytes {
            return refuse("payload larger than nats.max_event_bytes");
        }
        let Ok(data) = std::str::from_utf8(payload) else {
            return refuse("payload is not UTF-8");
        };
        let event_type = match header(EVENT_TYPE_HEADER) {
            None => None,
            Some(value) => match EventType::new(value) {
                Ok(event_type) => Some(event_type),
                Err(_) => return refuse("invalid Herald-Event header"),
            },
        };
        let trace =
            header("traceparent").and_then(|tp| TraceParent::parse(tp, header("tracestate")));
        Some(Event::new(self.id(seq), target, event_type, data, published_at).with_trace(trace))
    }

    fn deliver(&self, event: Event) {
        self.sink.deliver(&Arc::new(event));
    }

    /// The sequence of the newest stored message on `subject` (0 if none).
    async fn last_stored(&self, subject: &str) -> Result<u64, String> {
        match self.stream.get_last_raw_message_by_subject(subject).await {
            Ok(message) => Ok(message.sequence),
            Err(err) if err.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(0),
            Err(err) => Err(err.to_string()),
        }
    }

    /// The stored messages of `subject` after `after` and before `before`.
    async fn stored_after(
        &self,
        subject: &str,
        after: u64,
        before: u64,
        limit: usize,
    ) -> Result<Vec<Event>, String> {
        let mut events = Vec::new();
        let mut next = after + 1;
        loop {
            let message = match self
                .stream
                .get_first_raw_message_by_subject(subject, next)
                .await
            {
                Ok(message) => message,
                Err(err) if err.kind() == stream::RawMessageErrorKind::NoMessageFound => break,
                Err(err) => return Err(err.to_string()),
            };
            if message.sequence >= before {
                break;
            }
            next = message.sequence + 1;
            if let Some(event) = self.decode(
                message.subject.as_str(),
                message.sequence,
                Some(&message.headers),
                &message.payload,
                message.time.into(),
            ) {
                events.push(event);
            }
            if events.len() > limit {
                break;
            }
        }
        Ok(events)
    }

    /// Ends a follow: cancels its subscribing, or has the dispatcher drop its
    /// subscription.
    fn release(&self, follower: Follower) {
        follower.stop.cancel();
        let _ = self.live.send(live::Command::Release { key: follower.key });
    }

    /// Whether the follow `key` is still `target`'s current one.
    fn is_current_follow(&self, target: &Target, key: u64) -> bool {
        lock(&self.followers)
            .get(target)
            .is_some_and(|follower| follower.key == key)
    }

    /// The number of the current NATS connection (1 for the first). The
    /// client counts a connection before it reads anything from it, so a
    /// message read from a new connection is never seen with the old number;
    /// the event callback that tells the rest of the node runs later, in a
    /// task of its own, and a dispatcher round can come first.
    fn connection(&self) -> u64 {
        self.statistics.connects.load(Ordering::Relaxed)
    }

    /// Whether the connection is up and its history checked, right now.
    fn history_checked_now(&self) -> bool {
        self.connected.load(Ordering::SeqCst) && self.checked_connection().is_ok()
    }
}

/// Sets up live delivery of one target: subscribe, then hand the
/// subscription to the dispatcher, which says when the target is followed.
async fn subscribe(
    shared: Arc<Shared>,
    key: u64,
    target: Target,
    stop: CancellationToken,
    state: watch::Sender<FollowState>,
) {
    let live = target.subject(&shared.settings.live_prefix);
    let stored = target.subject(&shared.settings.subject_prefix);
    let generation = shared.history.generation();
    let setup = async {
        let subscription = shared
            .client
            .subscribe(live)
            .await
            .map_err(|err| err.to_string())?;
        // Once the server has the subscription, nothing stored later is
        // missed; what was stored before is the replay's job.
        shared.client.flush().await.map_err(|err| err.to_string())?;
        let last = shared.last_stored(&stored).await?;
        Ok::<_, String>((subscription, last))
    };
    let result = tokio::select! {
        _ = stop.cancelled() => return,
        result = setup => result,
    };
    match result {
        Ok((subscription, last)) => {
            let _ = shared.live.send(live::Command::Adopt {
                key,
                target,
                subscription,
                last,
                generation,
                state,
            });
        }
        Err(problem) => {
            let _ = state.send(FollowState::Failed(problem));
        }
    }
}

impl Interest for NatsBus {
    fn follow(&self, target: &Target) -> watch::Receiver<FollowState> {
        let (state, watch) = watch::channel(FollowState::Pending);
        let stop = CancellationToken::new();
        let key = self.shared.next_follow.fetch_add(1, Ordering::Relaxed);
        let previous = lock(&self.shared.followers).insert(
            target.clone(),
            Follower {
                key,
                stop: stop.clone(),
            },
        );
        if let Some(previous) = previous {
            self.shared.release(previous);
        }
        tokio::spawn(subscribe(
            Arc::clone(&self.shared),
            key,
            target.clone(),
            stop,
            state,
        ));
        watch
    }

    fn unfollow(&self, target: &Target) {
        let removed = lock(&self.shared.followers).remove(target);
        if let Some(follower) = removed {
            self.shared.release(follower);
        }
    }
}

#[async_trait::async_trait]
impl Bus for NatsBus {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn is_ready(&self) -> bool {
        self.shared.connected.load(Ordering::SeqCst)
    }

    async fn publish(&self, request: PublishRequest) -> Result<Receipt, PublishError> {
        let limit = self.shared.settings.max_event_bytes;
        if request.data.len() > limit {
            return Err(PublishError::TooLarge {
                size: request.data.len(),
                limit,
            });
        }
        let mut headers = HeaderMap::new();
        if let Some(event_type) = &request.event_type {
            headers.insert(EVENT_TYPE_HEADER, event_type.as_str());
        }
        if let Some(msg_id) = &request.msg_id {
            headers.insert("Nats-Msg-Id", msg_id.as_str());
        }
        if let Some(trace) = &request.trace {
            headers.insert("traceparent", trace.traceparent());
            if let Some(state) = trace.tracestate() {
                headers.insert("tracestate", state);
            }
        }
        let subject = request.target.subject(&self.shared.settings.subject_prefix);
        let unavailable = |reason: String| PublishError::Unavailable(reason);
        let ack = tokio::time::timeout(API_TIMEOUT, async {
            self.shared
                .jetstream
                .publish_with_headers(subject, headers, Bytes::from(request.data))
                .await
                .map_err(|err| unavailable(err.to_string()))?
                .await
                .map_err(|err| unavailable(err.to_string()))
        })
        .await
        .map_err(|_| unavailable("JetStream did not acknowledge in time".into()))??;
        Ok(Receipt {
            id: {
                self.shared.history.seen(ack.sequence);
                self.shared.id(ack.sequence)
            },
            duplicate: ack.duplicate,
        })
    }

    async fn head(&self) -> Result<EventId, ReplayError> {
        let connection = self.shared.checked_connection()?;
        let state = self.shared.state().await?;
        self.shared.still_on(connection)?;
        Ok(self.shared.id(state.last_sequence))
    }

    async fn replay(
        &self,
        targets: &[Target],
        after: EventId,
        limit: usize,
    ) -> Result<Replay, ReplayError> {
        let connection = self.shared.checked_connection()?;
        let replay = self.read_replay(targets, after, limit).await?;
        self.shared.still_on(connection)?;
        Ok(replay)
    }
}

impl NatsBus {
    /// [`Bus::replay`]'s reads, on a connection whose history was checked.
    async fn read_replay(
        &self,
        targets: &[Target],
        after: EventId,
        limit: usize,
    ) -> Result<Replay, ReplayError> {
        let shared = &self.shared;
        let state = shared.state().await?;
        let head = shared.id(state.last_sequence);
        let lost = |reason| Ok(Replay::HistoryLost { reason, head });
        let bounds = (state.first_sequence, state.last_sequence);
        if let Some(reason) = check_position(after, shared.epoch(), bounds.0, bounds.1) {
            return lost(reason);
        }
        let mut events = Vec::new();
        for target in targets {
            let subject = target.subject(&shared.settings.subject_prefix);
            if self.evicted_after(&subject, after.seq).await? {
                return lost(LostReason::Expired);
            }
            let stored = shared
                .stored_after(&subject, after.seq, head.seq + 1, limit)
                .await
                .map_err(ReplayError)?;
            events.extend(stored);
            if events.len() > limit {
                return lost(LostReason::TooFarBehind);
            }
        }
        events.sort_by_key(|event| event.id.seq);
        Ok(Replay::Complete {
            events: events.into_iter().map(Arc::new).collect(),
            head,
        })
    }

    /// The NATS connection, for request/reply outside the event stream
    /// (cluster presence).
    pub fn client(&self) -> async_nats::Client {
        self.shared.client.clone()
    }

    /// Whether the per-subject limit may have evicted messages of `subject`
    /// after `after`. The per-subject limit removes a subject's oldest messages
    /// without moving the stream's first sequence, so compare with the subject
    /// itself: when the subject is at its cap and its oldest retained message
    /// is newer than `after + 1`, something after `after` may be gone. This can
    /// answer "yes" for a gap that never held a message of this subject (a
    /// needless reset), never "no" for a real eviction (a silent skip).
    async fn evicted_after(&self, subject: &str, after: u64) -> Result<bool, ReplayError> {
        let cap = u64::try_from(self.shared.settings.max_messages_per_subject).unwrap_or(u64::MAX);
        let count = {
            let mut subjects = self
                .shared
                .stream
                .info_with_subjects(subject)
                .await
                .map_err(|err| ReplayError(err.to_string()))?;
            let mut count = 0u64;
            while let Some(entry) = subjects.next().await {
                let (_, messages) = entry.map_err(|err| ReplayError(err.to_string()))?;
                count += messages as u64;
            }
            count
        };
        if count < cap {
            return Ok(false);
        }
        match self
            .shared
            .stream
            .get_first_raw_message_by_subject(subject, 1)
            .await
        {
            Ok(oldest) => Ok(oldest.sequence > after + 1),
            Err(err) if err.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(false),
            Err(err) => Err(ReplayError(err.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_older_than_2_10_are_refused() {
        assert!(check_version("2.9.25").is_err());
        assert!(check_version("v2.9.10").is_err());
        assert!(check_version("2.10.23").is_ok());
        assert!(check_version("2.11.9").is_ok());
        assert!(check_version("2.12.0-beta.1").is_ok());
    }

    #[test]
    fn start_up_waits_only_for_a_cluster_still_forming() {
        use jetstream::context::CreateStreamErrorKind as Kind;
        let refused = |code: u64| {
            let error: jetstream::Error = serde_json::from_value(serde_json::json!({
                "code": 400, "err_code": code, "description": "refused"
            }))
            .expect("a JetStream API error");
            Kind::JetStream(error)
        };
        assert!(cluster_forming(&Kind::TimedOut));
        assert!(cluster_forming(&Kind::JetStreamUnavailable));
        // "no suitable peers for placement": the replicas have not joined yet.
        assert!(cluster_forming(&refused(10005)));
        // "stream name already in use with a different configuration".
        assert!(!cluster_forming(&refused(10058)));
        assert!(!cluster_forming(&Kind::InvalidStreamName));
    }

    #[test]
    fn a_stream_without_republish_or_with_other_subjects_conflicts() {
        let settings = NatsSettings::default();
        let wanted = stream_config(&settings);
        assert!(conflict(&wanted, &wanted).is_none());
        let mut other = wanted.clone();
        other.republish = None;
        assert_eq!(conflict(&other, &wanted).map(|c| c.0), Some("republish"));
        let mut other = wanted.clone();
        other.subjects = vec!["herald.>".into()];
        assert_eq!(conflict(&other, &wanted).map(|c| c.0), Some("subjects"));
        let mut other = wanted.clone();
        other.allow_direct = false;
        assert!(
            conflict(&other, &wanted).is_none(),
            "Herald reads from the stream leader, not with Direct Get"
        );
    }
}
