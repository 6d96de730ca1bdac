//! Cluster-wide disconnects and token revocation (`POST /v1/disconnect`).
//!
//! **Disconnect.** An order to end a user's streams travels on core NATS to
//! every node: its subject is `<nats.live_prefix>.control.disconnect.user.<token>`,
//! where `<token>` is the user's subject token (`herald_protocol::Target::token`),
//! so no user id can widen it to another user, and every node subscribes to
//! `<nats.live_prefix>.control.disconnect.>`. Each node ends the user's streams in
//! its registry behind what is already queued for them, writing the order's
//! reason event first when it has one, then a `retry:` hint. The node that took
//! the request hears its own order like the others.
//!
//! **Revocation.** An order may also revoke: the user's tokens issued at or
//! before `revoked_before` (unix seconds, the time the order was taken) are
//! refused until the entry expires, `auth.revocation_ttl_secs` later. The entry
//! is stored in the JetStream key-value bucket `<nats.stream>_REVOKED` (key: the
//! user's subject token, its `~` mark written `=`, the one character of it a
//! key may not hold; value `{"revoked_before": <secs>}`), whose `max_age` is the
//! TTL. Every node keeps a copy in [`Revocations`], fed by a watch of the bucket
//! (from its current content at start-up) and by the order itself, so a token is
//! checked on connect without a network round trip. Deleting a key
//! (`nats kv del`) lifts the revocation on every node.
//!
//! On the memory bus (one node) both happen in this process.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use bytes::{Bytes, BytesMut};
use dashmap::DashMap;
use futures_util::StreamExt;
use herald_protocol::{EventType, Target, TargetKind, sse};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::auth::{Subscriber, now_secs};
use crate::metrics::Metrics;
use crate::registry::{DisconnectReason, Registry};
use crate::telemetry::Tracing;

/// How long a node waits at start-up for the bucket's current content before
/// it serves anyway (the watch keeps filling the copy).
const LOAD_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the watch of the bucket waits before it is started again after
/// it failed or ended.
const REWATCH_AFTER: Duration = Duration::from_secs(1);

/// How long sending an order may take before the request is answered 503
/// (async-nats holds messages while it reconnects; the request must not).
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// How long after a revocation first heard of through the bucket the node
/// ends the user's streams itself, in case it missed the order (cut off from
/// NATS when it was sent): by then the order, had it come, has ended them.
const MISSED_ORDER_AFTER: Duration = Duration::from_secs(2);

/// How often expired entries leave the local copy.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Why cluster-wide disconnects (the order subscription, the revocation
/// bucket) could not be set up at start-up. The bucket may have been created
/// before a later step failed.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// Creating or updating the bucket failed (name, permissions, JetStream).
    #[error("revocation bucket {bucket}: {source}")]
    Bucket {
        /// The bucket name.
        bucket: String,
        /// async-nats' error.
        #[source]
        source: jetstream::context::CreateKeyValueError,
    },
    /// The bucket exists but cannot be watched.
    #[error("revocation bucket {bucket}: cannot watch it: {source}")]
    Watch {
        /// The bucket name.
        bucket: String,
        /// async-nats' error.
        #[source]
        source: kv::WatchError,
    },
    /// The control subjects cannot be subscribed to.
    #[error("cannot subscribe to disconnect orders on {subject}: {source}")]
    Orders {
        /// The wildcard subject.
        subject: String,
        /// async-nats' error.
        #[source]
        source: async_nats::SubscribeError,
    },
}

/// Why a disconnect order was not sent. When the revocation could not be
/// stored, nothing was sent; when the order could not be published, the
/// revocation (if asked) is stored and reaches every node's copy, but open
/// streams were not ended: retry.
#[derive(Debug, thiserror::Error)]
pub(crate) enum DisconnectError {
    /// The revocation could not be stored in the bucket.
    #[error("cannot store the revocation: {0}")]
    Store(#[source] kv::PutError),
    /// The order could not be published on NATS.
    #[error("cannot send the disconnect order: {0}")]
    Publish(#[source] async_nats::Error),
    /// The order was not sent within [`SEND_TIMEOUT`] (NATS unreachable); it
    /// may still go out once the connection is back.
    #[error("the disconnect order was not sent within {} s", SEND_TIMEOUT.as_secs())]
    TimedOut,
}

/// The event a disconnected stream receives before it ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ReasonEvent {
    /// The SSE event type (a publisher's: `herald.*` is refused).
    #[serde(rename = "type")]
    pub(crate) event_type: String,
    /// The SSE data, as text.
    pub(crate) data: String,
}

/// What travels on the control subject (the user is in the subject).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Order {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<ReasonEvent>,
    /// Set when the order revokes: tokens issued at or before are refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    revoked_before: Option<u64>,
}

/// The value stored in the bucket for a revoked user.
#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    revoked_before: u64,
}

/// This node's copy of the revocations: user id → the time before which
/// (inclusive) the user's tokens are refused.
#[derive(Debug)]
pub(crate) struct Revocations {
    revoked: DashMap<String, u64>,
    ttl_secs: u64,
}

impl Revocations {
    /// An empty copy whose entries last `ttl_secs`.
    pub(crate) fn new(ttl_secs: u64) -> Self {
        Revocations {
            revoked: DashMap::new(),
            ttl_secs,
        }
    }

    /// Records a revocation; of two for one user, the later one holds.
    /// Returns whether this one was news (later than what was known).
    fn record(&self, user: &str, revoked_before: u64) -> bool {
        let mut raised = true;
        self.revoked
            .entry(user.to_owned())
            .and_modify(|before| {
                raised = revoked_before > *before;
                *before = (*before).max(revoked_before);
            })
            .or_insert(revoked_before);
        raised
    }

    /// Forgets a user's revocation (its key was deleted from the bucket).
    fn forget(&self, user: &str) {
        self.revoked.remove(user);
    }

    /// Whether `subscriber`'s token is refused at `now` (unix seconds): its
    /// user was revoked at or after the token was issued, and the revocation
    /// has not expired. A token without `iat` or `nbf` cannot be shown to
    /// come after a revocation, so it is refused while one lasts.
    pub(crate) fn refuses(&self, subscriber: &Subscriber, now: u64) -> bool {
        let Some(before) = self.revoked.get(subscriber.user.name()).map(|b| *b) else {
            return false;
        };
        if before.saturating_add(self.ttl_secs) < now {
            return false;
        }
        subscriber
            .issued_at
            .is_none_or(|issued_at| issued_at <= before)
    }

    /// Drops the entries expired at `now`.
    fn prune(&self, now: u64) {
        self.revoked
            .retain(|_, before| before.saturating_add(self.ttl_secs) >= now);
    }
}

/// The bucket key of `user`: its subject token with the `~` mark (the only
/// character of a token a key may not hold) written `=`, which no token holds.
fn key_of(user: &Target) -> String {
    user.token().replacen('~', "=", 1)
}

/// The user a bucket key stands for (`None`: not a key [`key_of`] writes).
fn user_of(key: &str) -> Option<Target> {
    Target::from_token(TargetKind::User, &key.replacen('=', "~", 1)).ok()
}

/// The NATS side: the control subjects and the bucket.
#[derive(Debug, Clone)]
struct Control {
    client: async_nats::Client,
    bucket: kv::Store,
    /// `<live_prefix>.control.disconnect`: an order's subject is this plus
    /// `.user.<token>`.
    prefix: String,
}

/// What [`Disconnects::start`] subscribed to (nothing on the memory bus),
/// handed to [`Disconnects::serve`]: subscribed before the node serves, so no
/// order sent once it answers requests is missed.
pub(crate) struct Subscriptions(Option<(async_nats::Subscriber, kv::Watch)>);

impl std::fmt::Debug for Subscriptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Subscriptions")
            .field(&self.0.is_some())
            .finish()
    }
}

/// Sends and carries out disconnect orders, and keeps the revocations.
#[derive(Debug, Clone)]
pub(crate) struct Disconnects {
    nats: Option<Control>,
    registry: Arc<Registry>,
    revocations: Arc<Revocations>,
    metrics: Arc<Metrics>,
    tracing: Arc<Tracing>,
}

/// What [`Disconnects::start`] needs from the node.
#[derive(Debug)]
pub(crate) struct DisconnectParts<'a> {
    /// The settings.
    pub(crate) settings: &'a herald_config::Settings,
    /// The NATS connection (`None`: memory bus, this node alone).
    pub(crate) client: Option<async_nats::Client>,
    /// The node's streams.
    pub(crate) registry: Arc<Registry>,
    /// The node's metrics.
    pub(crate) metrics: Arc<Metrics>,
    /// For user ids in logs.
    pub(crate) tracing: Arc<Tracing>,
}

impl Disconnects {
    /// Sets up the bucket (NATS) and loads its current content into the
    /// local copy; the watch started here goes on in [`Disconnects::serve`].
    pub(crate) async fn start(
        parts: DisconnectParts<'_>,
    ) -> Result<(Disconnects, Subscriptions), RevocationError> {
        let settings = parts.settings;
        let revocations = Arc::new(Revocations::new(settings.auth.revocation_ttl_secs));
        let (nats, subscriptions) = match parts.client {
            None => (None, None),
            Some(client) => {
                let bucket_name = format!("{}_REVOKED", settings.nats.stream);
                let bucket = jetstream::new(client.clone())
                    .create_or_update_key_value(kv::Config {
                        bucket: bucket_name.clone(),
                        description: "Herald: revoked users (POST /v1/disconnect)".into(),
                        history: 1,
                        max_age: Duration::from_secs(settings.auth.revocation_ttl_secs),
                        num_replicas: settings.nats.replicas,
                        storage: match settings.nats.storage {
                            herald_config::NatsStorage::File => {
                                jetstream::stream::StorageType::File
                            }
                            herald_config::NatsStorage::Memory => {
                                jetstream::stream::StorageType::Memory
                            }
                        },
                        ..Default::default()
                    })
                    .await
                    .map_err(|source| RevocationError::Bucket {
                        bucket: bucket_name.clone(),
                        source,
                    })?;
                let stored = bucket.status().await.map_or(0, |status| status.values());
                let mut watch = bucket.watch_with_history(">").await.map_err(|source| {
                    RevocationError::Watch {
                        bucket: bucket_name.clone(),
                        source,
                    }
                })?;
                load(&revocations, &mut watch, stored).await;
                let prefix = format!("{}.control.disconnect", settings.nats.live_prefix);
                let subject = format!("{prefix}.>");
                let orders = client
                    .subscribe(subject.clone())
                    .await
                    .map_err(|source| RevocationError::Orders { subject, source })?;
                let control = Control {
                    client,
                    bucket,
                    prefix,
                };
                (Some(control), Some((orders, watch)))
            }
        };
        let disconnects = Disconnects {
            nats,
            registry: parts.registry,
            revocations,
            metrics: parts.metrics,
            tracing: parts.tracing,
        };
        Ok((disconnects, Subscriptions(subscriptions)))
    }

    /// Whether `subscriber`'s token was revoked (answered from memory).
    pub(crate) fn refuses(&self, subscriber: &Subscriber) -> bool {
        self.revocations.refuses(subscriber, now_secs())
    }

    /// Ends every stream of `user` on every node, writing `reason` first;
    /// with `revoke`, stores the revocation before the order goes out (so a
    /// stream that ends can only come back with a newer token). Returns the
    /// revocation's time when it revoked.
    pub(crate) async fn disconnect(
        &self,
        user: &Target,
        reason: Option<ReasonEvent>,
        revoke: bool,
    ) -> Result<Option<u64>, DisconnectError> {
        let revoked_before = revoke.then(now_secs);
        let order = Order {
            reason,
            revoked_before,
        };
        let Some(control) = &self.nats else {
            self.carry_out(user, order);
            return Ok(revoked_before);
        };
        if let Some(revoked_before) = revoked_before {
            let value = serde_json::to_vec(&Entry { revoked_before })
                .expect("a struct of one integer serializes");
            control
                .bucket
                .put(key_of(user), Bytes::from(value))
                .await
                .map_err(DisconnectError::Store)?;
        }
        let payload = serde_json::to_vec(&order).expect("an order serializes");
        let send = async {
            control
                .client
                .publish(user.subject(&control.prefix), Bytes::from(payload))
                .await
                .map_err(|err| DisconnectError::Publish(err.into()))?;
            // Sent before the request is answered.
            control
                .client
                .flush()
                .await
                .map_err(|err| DisconnectError::Publish(err.into()))
        };
        tokio::time::timeout(SEND_TIMEOUT, send)
            .await
            .map_err(|_| DisconnectError::TimedOut)??;
        Ok(revoked_before)
    }

    /// Carries out an order here: records its revocation, then asks each of
    /// the user's streams to end (after its reason event).
    fn carry_out(&self, user: &Target, order: Order) {
        if let Some(before) = order.revoked_before {
            self.revocations.record(user.name(), before);
        }
        let notice = order.reason.and_then(|reason| match EventType::new(reason.event_type) {
            Ok(event_type) => {
                let mut frame = BytesMut::new();
                sse::write_event(&mut frame, None, Some(&event_type), &reason.data);
                Some(Arc::new(frame.freeze()))
            }
            Err(err) => {
                tracing::warn!(error = %err, "disconnect order with an invalid reason type; ending streams without it");
                None
            }
        });
        let why = if order.revoked_before.is_some() {
            DisconnectReason::Revoked
        } else {
            DisconnectReason::Disconnected
        };
        let streams = self.registry.end_streams_of(user, why, notice.as_ref());
        self.metrics.user_disconnects.inc();
        tracing::info!(
            user = %self.tracing.user_for_logs(user),
            streams,
            revoked = order.revoked_before.is_some(),
            "disconnect order: ending the user's streams here"
        );
    }

    /// Carries out orders from every node and follows the bucket, until
    /// `shutdown`, on what [`Disconnects::start`] subscribed to.
    pub(crate) async fn serve(self, subscriptions: Subscriptions, shutdown: CancellationToken) {
        let (Some(control), Some((orders, watch))) = (self.nats.clone(), subscriptions.0) else {
            return;
        };
        let orders = self
            .clone()
            .follow_orders(control.clone(), orders, shutdown.clone());
        let bucket = self.follow_bucket(control, Some(watch), shutdown);
        tokio::join!(orders, bucket);
    }

    /// Carries out every order on the control subjects until `shutdown`.
    async fn follow_orders(
        self,
        control: Control,
        mut orders: async_nats::Subscriber,
        shutdown: CancellationToken,
    ) {
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return,
                message = orders.next() => match message {
                    Some(message) => message,
                    None => return,
                },
            };
            let user = Target::from_subject(&control.prefix, &message.subject)
                .ok()
                .filter(|target| target.kind() == TargetKind::User);
            let order = serde_json::from_slice::<Order>(&message.payload);
            match (user, order) {
                (Some(user), Ok(order)) => self.carry_out(&user, order),
                _ => {
                    tracing::warn!(subject = %message.subject, "ignoring a malformed disconnect order")
                }
            }
        }
    }

    /// Keeps the local copy in step with the bucket until `shutdown`,
    /// watching it again (from its current content) whenever the watch ends,
    /// and dropping expired entries.
    async fn follow_bucket(
        self,
        control: Control,
        mut watch: Option<kv::Watch>,
        shutdown: CancellationToken,
    ) {
        let mut prune = tokio::time::interval(PRUNE_EVERY);
        loop {
            let Some(current) = watch.as_mut() else {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(REWATCH_AFTER) => {}
                }
                watch = match control.bucket.watch_with_history(">").await {
                    Ok(watch) => Some(watch),
                    Err(err) => {
                        tracing::warn!(error = %err, "cannot watch the revocation bucket; retrying");
                        None
                    }
                };
                continue;
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = prune.tick() => self.revocations.prune(now_secs()),
                entry = current.next() => match entry {
                    Some(Ok(entry)) => {
                        if let Some(user) = absorb(&self.revocations, &entry) {
                            tokio::spawn(self.clone().end_unless_ordered(user, shutdown.clone()));
                        }
                    }
                    Some(Err(err)) => {
                        tracing::warn!(error = %err, "revocation bucket watch failed; watching again");
                        watch = None;
                    }
                    None => watch = None,
                },
            }
        }
    }
}

impl Disconnects {
    /// For a revocation heard of through the bucket before (or without) its
    /// order: after [`MISSED_ORDER_AFTER`], ends the user's streams still
    /// open here. Streams the order ended are gone by then; a stream opened
    /// since with a newer token merely reconnects (it resumes from its last
    /// id), the price of not leaving a revoked stream open.
    async fn end_unless_ordered(self, user: Target, shutdown: CancellationToken) {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(MISSED_ORDER_AFTER) => {}
        }
        let streams = self
            .registry
            .end_streams_of(&user, DisconnectReason::Revoked, None);
        if streams > 0 {
            tracing::warn!(
                user = %self.tracing.user_for_logs(&user),
                streams,
                "revocation heard of through the bucket: ending the user's remaining streams here"
            );
        }
    }
}

/// Reads the bucket's current content (`stored` entries or fewer: some may
/// have expired since) into `revocations`, for at most [`LOAD_TIMEOUT`].
async fn load(revocations: &Revocations, watch: &mut kv::Watch, stored: u64) {
    if stored == 0 {
        return;
    }
    let loaded = tokio::time::timeout(LOAD_TIMEOUT, async {
        while let Some(entry) = watch.next().await {
            match entry {
                Ok(entry) => {
                    // At start-up no stream is open yet: nothing to end.
                    let _ = absorb(revocations, &entry);
                    if entry.delta == 0 {
                        return;
                    }
                }
                Err(err) => {
                    tracing::warn!(error = %err, "reading the revocation bucket failed");
                    return;
                }
            }
        }
    })
    .await;
    if loaded.is_err() {
        tracing::warn!(
            timeout_ms = LOAD_TIMEOUT.as_millis() as u64,
            "the revocation bucket was not read in time; serving while it loads"
        );
    }
}

/// Applies one bucket entry to the local copy; returns the user when the
/// entry revoked them later than the copy knew.
fn absorb(revocations: &Revocations, entry: &kv::Entry) -> Option<Target> {
    let Some(user) = user_of(&entry.key) else {
        tracing::warn!(key = %entry.key, "ignoring a revocation bucket key Herald did not write");
        return None;
    };
    match entry.operation {
        kv::Operation::Put => match serde_json::from_slice::<Entry>(&entry.value) {
            Ok(value) => revocations
                .record(user.name(), value.revoked_before)
                .then_some(user),
            Err(err) => {
                tracing::warn!(key = %entry.key, error = %err, "ignoring a malformed revocation entry");
                None
            }
        },
        kv::Operation::Delete | kv::Operation::Purge => {
            revocations.forget(user.name());
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn subscriber(user: &str, issued_at: Option<u64>) -> Subscriber {
        Subscriber {
            user: Target::user(user).expect("valid"),
            topics: Vec::new(),
            expires_at: SystemTime::now(),
            issued_at,
        }
    }

    #[test]
    fn a_token_issued_at_or_before_the_revocation_is_refused_and_a_later_one_is_not() {
        let revocations = Revocations::new(3600);
        revocations.record("alice", 1_000);
        assert!(revocations.refuses(&subscriber("alice", Some(999)), 1_001));
        assert!(revocations.refuses(&subscriber("alice", Some(1_000)), 1_001));
        assert!(!revocations.refuses(&subscriber("alice", Some(1_001)), 1_001));
        assert!(!revocations.refuses(&subscriber("bob", Some(1)), 1_001));
    }

    #[test]
    fn a_token_without_an_issue_time_is_refused_while_a_revocation_lasts() {
        let revocations = Revocations::new(3600);
        revocations.record("alice", 1_000);
        assert!(revocations.refuses(&subscriber("alice", None), 2_000));
        assert!(!revocations.refuses(&subscriber("bob", None), 2_000));
    }

    #[test]
    fn a_revocation_ends_after_its_ttl_and_is_then_pruned() {
        let revocations = Revocations::new(100);
        revocations.record("alice", 1_000);
        assert!(revocations.refuses(&subscriber("alice", Some(500)), 1_100));
        assert!(!revocations.refuses(&subscriber("alice", Some(500)), 1_101));
        revocations.prune(1_100);
        assert_eq!(revocations.revoked.len(), 1);
        revocations.prune(1_101);
        assert!(revocations.revoked.is_empty());
    }

    #[test]
    fn of_two_revocations_the_later_holds_whatever_order_they_arrive_in() {
        let revocations = Revocations::new(3600);
        assert!(revocations.record("alice", 2_000));
        assert!(!revocations.record("alice", 1_000));
        assert!(!revocations.record("alice", 2_000));
        assert!(revocations.refuses(&subscriber("alice", Some(1_500)), 2_001));
        revocations.forget("alice");
        assert!(!revocations.refuses(&subscriber("alice", Some(1_500)), 2_001));
    }

    #[test]
    fn every_user_id_has_one_valid_bucket_key_that_names_it_back() {
        for name in ["alice", "a.b", "*", ">", "a b", "~", "é", "=x", "~YWxpY2U"] {
            let user = Target::user(name).expect("valid");
            let key = key_of(&user);
            assert!(
                !key.is_empty()
                    && key
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)),
                "{name} -> {key}"
            );
            assert_eq!(user_of(&key), Some(user), "{name} -> {key}");
        }
        // The base64 spelling of a plain name is not a second key for it.
        assert_eq!(user_of("=YWxpY2U"), None);
    }
}
