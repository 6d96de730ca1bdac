//! The NATS JetStream bus: many edge nodes, one durable, ordered history.
//!
//! - **Storage.** Every event is a message on `<prefix>.user.<token>` or
//!   `<prefix>.topic.<token>` in one stream (`HERALD`); the stream sequence is
//!   the SSE id's sequence, and the stream's epoch (its creation time, or a
//!   value a node wrote after finding the history went back) is the id's
//!   epoch, so every node computes the same ids ([`store`]).
//! - **Live path.** The stream RePublishes each stored message under
//!   `<live_prefix>.…` with its sequence, the previous sequence of the same
//!   subject and its store time. A node subscribes (core NATS) only to the
//!   targets it holds connections for: interest-based fan-out, no firehose
//!   ([`follow`]). Each followed target's deliveries form a chain; a copy is
//!   delivered only when it connects to the chain's end, a gap is filled from
//!   the stream first, a duplicate is dropped, and a sequence reused for
//!   another event (a rewound history) ends every stream with a reset
//!   ([`chain`], [`dispatcher`]). A periodic check repairs lost copies of
//!   quiet targets within a bound.
//! - **Outages.** When the connection drops, streams stay open and `/readyz`
//!   turns unready; when it is back, the dispatcher checks every target at
//!   once (what was republished meanwhile is gone) — but correctness rests on
//!   the chains, not on being told.
//! - **Lingering.** A target whose last stream closed stays followed for
//!   `nats.linger_secs`, recording what it receives, so a client coming back
//!   to the node resumes from the record without a stream read ([`recent`]).
//! - **Replay.** Each target's messages after the client's position for it,
//!   up to the head read from the stream leader, are read with batched
//!   Direct Gets trusted only when their answer proves itself complete, else
//!   from the leader ([`replay`]). History that is gone (older than the
//!   stream's first message, evicted by the per-subject limit, another
//!   epoch) is reported, never skipped.
//!
//! Parts: [`provision`] (connection, version check, the stream), [`store`]
//! (every read of the stream, the epoch), [`coalesce`] (one state read for
//! many callers), [`gather`] (newest-of reads shared by callers arriving
//! together), [`recent`] (what a lingering target recorded), [`replay`] (what a resuming client missed), [`decode`]
//! (message → event),
//! [`follow`] (which targets are followed), [`chain`] (the delivery
//! invariant), [`dispatcher`] (live delivery and repair).

mod chain;
mod coalesce;
mod decode;
mod dispatcher;
mod follow;
mod gather;
mod provision;
mod recent;
mod replay;
mod store;
mod sweep;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::{HeaderMap, HeaderValue};
use bytes::Bytes;
use herald_config::NatsSettings;
use herald_protocol::{EventId, StreamPosition, Target};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

pub(crate) use decode::EVENT_TYPE_HEADER;
pub(crate) use follow::FollowError;
pub(crate) use store::ReadError;

use super::{
    Bus, FollowState, Interest, LiveSink, PublishError, PublishRequest, Receipt, Replay,
    ReplayError,
};
use crate::metrics::Metrics;
use crate::telemetry::Tracing;
use decode::Decoder;
use dispatcher::Dispatcher;
use follow::{FollowParts, Followers};
use provision::{ConnectionEvents, MIN_SERVER};
use replay::Replayer;
use store::{API_TIMEOUT, Store};

/// Why the NATS bus could not start. Nothing was created or changed on the
/// server unless the error says so.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// The server could not be reached or refused the credentials.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// The configured URL(s).
        url: String,
        /// What went wrong.
        #[source]
        source: async_nats::ConnectError,
    },
    /// A settings value could not be used (bad URL, unreadable file).
    #[error("{key}: {source}")]
    Setting {
        /// The settings key.
        key: &'static str,
        /// What is wrong (async-nats reports both as I/O errors).
        #[source]
        source: std::io::Error,
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
    /// Creating, reading or updating the stream failed (the stream may have
    /// been created or updated before a later step failed).
    #[error("stream {stream}: {source}")]
    Stream {
        /// The stream name.
        stream: String,
        /// What went wrong (one of async-nats' per-operation errors).
        #[source]
        source: async_nats::Error,
    },
    /// The stream is ready but its leader advisories cannot be heard (the
    /// stream was created or validated; nothing else changed).
    #[error("stream {stream}: cannot subscribe to its leader advisories: {source}")]
    LeaderAdvisories {
        /// The stream name.
        stream: String,
        /// The subscription's error.
        #[source]
        source: async_nats::SubscribeError,
    },
}

/// The NATS JetStream bus.
pub(crate) struct NatsBus {
    client: async_nats::Client,
    jetstream: jetstream::Context,
    settings: NatsSettings,
    store: Arc<Store>,
    decoder: Arc<Decoder>,
    followers: Arc<Followers>,
    connection: Arc<ConnectionEvents>,
    /// Cancelled when the bus is dropped: ends the dispatcher.
    stop: CancellationToken,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("stream", &self.settings.stream)
            .field("epoch", &self.store.epoch())
            .finish_non_exhaustive()
    }
}

impl Drop for NatsBus {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// What a node hands the bus to deliver and report through.
pub(crate) struct Wiring {
    /// Where live events go (the registry).
    pub(crate) sink: Arc<dyn LiveSink>,
    /// The node's metrics.
    pub(crate) metrics: Arc<Metrics>,
    /// The node's delivery tracing.
    pub(crate) tracing: Arc<Tracing>,
}

impl std::fmt::Debug for Wiring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wiring").finish_non_exhaustive()
    }
}

impl NatsBus {
    /// Connects, checks the server version, creates or validates the stream,
    /// and starts live delivery.
    pub(crate) async fn connect(
        settings: &NatsSettings,
        node_id: &str,
        wiring: Wiring,
    ) -> Result<NatsBus, NatsError> {
        let connection = Arc::new(ConnectionEvents::default());
        let metrics = &wiring.metrics;
        let client = provision::connect_client(
            settings,
            node_id,
            Arc::clone(&connection),
            Arc::clone(metrics),
        )
        .await?;
        connection.connected.store(true, Ordering::SeqCst);
        metrics.nats_connected.set(1);
        let version = client.server_info().version;
        provision::check_version(&version)?;
        let jetstream = jetstream::new(client.clone());
        let (stream, epoch) = provision::ensure_stream(&jetstream, settings).await?;
        ::tracing::info!(
            url = %settings.url,
            stream = %settings.stream,
            server = %version,
            epoch = %format!("{epoch:x}"),
            "connected to NATS JetStream"
        );
        let store = Arc::new(Store::new(
            client.clone(),
            jetstream.clone(),
            stream,
            settings.stream.clone(),
            epoch,
            provision::has_batched_reads(&version),
            store::subjects_per_batch(settings.subscription_capacity),
        ));
        let decoder = Arc::new(Decoder::new(
            settings.subject_prefix.clone(),
            settings.max_event_bytes,
            Arc::clone(metrics),
        ));
        let (followers, stop) =
            start_live(settings, &client, &store, &decoder, &connection, wiring).await?;
        Ok(NatsBus {
            client,
            jetstream,
            settings: settings.clone(),
            store,
            decoder,
            followers,
            connection,
            stop,
        })
    }

    /// The NATS connection, for request/reply outside the event stream
    /// (cluster presence).
    pub(crate) fn client(&self) -> async_nats::Client {
        self.client.clone()
    }
}

/// Starts live delivery: the followers, and the dispatcher they hand their
/// subscriptions to, which runs until the returned token is cancelled.
async fn start_live(
    settings: &NatsSettings,
    client: &async_nats::Client,
    store: &Arc<Store>,
    decoder: &Arc<Decoder>,
    connection: &Arc<ConnectionEvents>,
    wiring: Wiring,
) -> Result<(Arc<Followers>, CancellationToken), NatsError> {
    let (commands, received) = mpsc::unbounded_channel();
    // One buffer for every followed target's live copies.
    let (copies, copies_received) = mpsc::channel(settings.subscription_capacity);
    let followers = Arc::new(Followers::new(FollowParts {
        client: client.clone(),
        store: Arc::clone(store),
        live_prefix: settings.live_prefix.clone(),
        subject_prefix: settings.subject_prefix.clone(),
        dispatcher: commands,
        copies,
        linger: Duration::from_secs(settings.linger_secs),
        metrics: Arc::clone(&wiring.metrics),
    }));
    // Before any target is followed: a leader elected from now on is heard.
    let leader_changes = client
        .subscribe(format!(
            "$JS.EVENT.ADVISORY.STREAM.LEADER_ELECTED.{}",
            settings.stream
        ))
        .await
        .map_err(|source| NatsError::LeaderAdvisories {
            stream: settings.stream.clone(),
            source,
        })?;
    let stop = CancellationToken::new();
    let dispatcher = Dispatcher::new(dispatcher::Parts {
        store: Arc::clone(store),
        decoder: Arc::clone(decoder),
        sink: wiring.sink,
        metrics: wiring.metrics,
        tracing: wiring.tracing,
        connection: Arc::clone(connection),
        commands: received,
        copies: copies_received,
        leader_changes,
        check_interval: Duration::from_millis(settings.check_interval_ms),
        linger_max_events: settings.linger_max_events,
        stop: stop.clone(),
    });
    tokio::spawn(tokio::task::unconstrained(dispatcher.run()));
    tokio::spawn(Arc::clone(&followers).release_when_due(stop.clone()));
    Ok((followers, stop))
}

impl Interest for NatsBus {
    fn follow(&self, target: &Target) -> watch::Receiver<FollowState> {
        self.followers.follow(target)
    }

    fn unfollow(&self, target: &Target) {
        self.followers.unfollow(target);
    }
}

#[async_trait::async_trait]
impl Bus for NatsBus {
    fn kind(&self) -> &'static str {
        "nats"
    }

    fn is_ready(&self) -> bool {
        self.connection.connected.load(Ordering::SeqCst)
    }

    fn delivers_in_order(&self) -> bool {
        false
    }

    async fn publish(&self, request: PublishRequest) -> Result<Receipt, PublishError> {
        let limit = self.settings.max_event_bytes;
        if request.data.len() > limit {
            return Err(PublishError::TooLarge {
                size: request.data.len(),
                limit,
            });
        }
        let mut headers = HeaderMap::new();
        let mut insert = |name: &'static str, field: &'static str, value: &str| {
            let value = value
                .parse::<HeaderValue>()
                .map_err(|_| PublishError::Invalid { field })?;
            headers.insert(name, value);
            Ok::<_, PublishError>(())
        };
        if let Some(event_type) = &request.event_type {
            insert(EVENT_TYPE_HEADER, "event", event_type.as_str())?;
        }
        if let Some(msg_id) = &request.msg_id {
            insert("Nats-Msg-Id", "msg_id", msg_id)?;
        }
        if let Some(trace) = &request.trace {
            insert("traceparent", "traceparent", trace.traceparent())?;
            if let Some(state) = trace.tracestate() {
                insert("tracestate", "tracestate", state)?;
            }
        }
        let subject = request.target.subject(&self.settings.subject_prefix);
        let ack = tokio::time::timeout(API_TIMEOUT, async {
            self.jetstream
                .publish_with_headers(subject, headers, Bytes::from(request.data))
                .await
                .map_err(|err| PublishError::Unavailable(err.into()))?
                .await
                .map_err(|err| PublishError::Unavailable(err.into()))
        })
        .await
        .map_err(|_| PublishError::Unavailable("JetStream did not acknowledge in time".into()))??;
        Ok(Receipt {
            id: self.store.id(ack.sequence),
            duplicate: ack.duplicate,
        })
    }

    async fn head(&self) -> Result<EventId, ReplayError> {
        let state = self.store.state().await?;
        Ok(self.store.id(state.last_sequence))
    }

    async fn replay(
        &self,
        targets: &[Target],
        from: &StreamPosition,
        limit: usize,
    ) -> Result<Replay, ReplayError> {
        if let Some(kept) = self.followers.recorded(targets, from, limit).await {
            return Ok(Replay::Complete {
                events: kept.events,
                head: EventId {
                    epoch: from.epoch,
                    seq: kept.head,
                },
            });
        }
        let replayer = Replayer {
            store: &self.store,
            decoder: &self.decoder,
            per_subject: u64::try_from(self.settings.max_messages_per_subject).unwrap_or(u64::MAX),
        };
        replayer.replay(targets, from, limit).await
    }
}

/// Locks `mutex`, taking over the data of a holder that panicked (every
/// value guarded in this bus stays valid between statements).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
