//! Following targets: which targets the node follows, and setting up each
//! follow (subscribe, then anchor the chain) for the dispatcher.
//!
//! Every followed target's live subscription delivers into one channel the
//! dispatcher reads (see [`Client::subscribe_with_sender`]: no buffer per
//! target); the dispatcher routes each copy by its subject. The dispatcher
//! hears of a follow ([`Command::Follow`]) before its subscription exists and
//! holds its copies until the chain is anchored ([`Command::Anchored`]).
//!
//! Each follow gets a key. Its commands are sent under the lock that records
//! the target's current follow, so the dispatcher sees a target's follows and
//! releases in the order they happened: an unfollow racing a follow never
//! leaves a stale subscription delivering (the dispatcher drops the
//! subscription of a follow it no longer has, which unsubscribes it).
//!
//! **Lingering.** When a target's last stream closes, its follow is kept for
//! `nats.linger_secs` and the dispatcher records what it delivers meanwhile
//! ([`recent`](super::recent)): a stream that follows the target again within
//! that time takes the follow over as it is (no subscription, no read), and
//! its replay is answered from the record ([`Followers::recorded`]). The
//! follow is released when the time is up, unless taken over (each linger has
//! a ticket; a release checks it is still the same linger).
//!
//! [`Client::subscribe_with_sender`]: async_nats::Client::subscribe_with_sender

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_protocol::{StreamPosition, Target};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::dispatcher::{Command, Kept};
use super::lock;
use super::store::{ReadError, Store};
use crate::bus::FollowState;
use crate::metrics::Metrics;

/// Why live delivery of a target could not be set up. Nothing is followed
/// (a subscription already made is dropped with the follow).
#[derive(Debug, thiserror::Error)]
pub(crate) enum FollowError {
    /// The target's live subject could not be subscribed to.
    #[error(transparent)]
    Subscribe(#[from] async_nats::SubscribeError),
    /// The server did not confirm the subscription.
    #[error(transparent)]
    Flush(#[from] async_nats::client::FlushError),
    /// The chain could not be anchored at the target's newest stored event.
    #[error(transparent)]
    Anchor(#[from] ReadError),
}

/// A followed target's current follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Current {
    key: u64,
    /// While no stream follows it: the ticket of this linger.
    lingering: Option<u64>,
    /// Taken over from a linger: the dispatcher may hold a record of what
    /// it delivered meanwhile (only then is a replay asked of it).
    revived: bool,
}

/// A lingering follow to release once its time is up.
struct Due {
    at: Instant,
    target: Target,
    current: Current,
}

/// The targets this node follows.
pub(super) struct Followers {
    client: async_nats::Client,
    store: Arc<Store>,
    live_prefix: String,
    subject_prefix: String,
    /// Each followed target's current follow.
    current: Mutex<HashMap<Target, Current>>,
    next_key: AtomicU64,
    dispatcher: mpsc::UnboundedSender<Command>,
    /// Where every live subscription delivers (the dispatcher reads it).
    copies: mpsc::Sender<async_nats::Message>,
    /// How long a follow lingers once its last stream closed
    /// (`nats.linger_secs`; zero: not at all).
    linger: Duration,
    /// Lingering follows by when they are released (the time is constant,
    /// so this is their order of lingering).
    due: Mutex<VecDeque<Due>>,
    /// Wakes [`Followers::release_when_due`] when `due` was empty.
    due_added: Notify,
    metrics: Arc<Metrics>,
}

/// What [`Followers::new`] needs.
pub(super) struct FollowParts {
    pub(super) client: async_nats::Client,
    pub(super) store: Arc<Store>,
    pub(super) live_prefix: String,
    pub(super) subject_prefix: String,
    pub(super) dispatcher: mpsc::UnboundedSender<Command>,
    pub(super) copies: mpsc::Sender<async_nats::Message>,
    pub(super) linger: Duration,
    pub(super) metrics: Arc<Metrics>,
}

impl Followers {
    pub(super) fn new(parts: FollowParts) -> Self {
        Followers {
            client: parts.client,
            store: parts.store,
            live_prefix: parts.live_prefix,
            subject_prefix: parts.subject_prefix,
            current: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
            dispatcher: parts.dispatcher,
            copies: parts.copies,
            linger: parts.linger,
            due: Mutex::new(VecDeque::new()),
            due_added: Notify::new(),
            metrics: parts.metrics,
        }
    }

    /// Starts following `target` (or takes over its lingering follow); the
    /// watch turns ready once the dispatcher delivers it.
    pub(super) fn follow(self: &Arc<Self>, target: &Target) -> watch::Receiver<FollowState> {
        let (state, watch) = watch::channel(FollowState::Pending);
        let (key, live) = {
            let mut current = lock(&self.current);
            if let Some(entry) = current.get_mut(target) {
                if entry.lingering.take().is_some() {
                    // Taken over as it is.
                    entry.revived = true;
                    self.metrics.nats_lingering.dec();
                    let _ = self.dispatcher.send(Command::Revive {
                        key: entry.key,
                        state,
                    });
                    return watch;
                }
                let _ = self.dispatcher.send(Command::Release { key: entry.key });
            }
            let key = self.next_key.fetch_add(1, Ordering::Relaxed);
            let live = target.subject(&self.live_prefix);
            current.insert(
                target.clone(),
                Current {
                    key,
                    lingering: None,
                    revived: false,
                },
            );
            // Before the subscription exists: its first copy finds its route.
            let _ = self.dispatcher.send(Command::Follow {
                key,
                target: target.clone(),
                live: live.as_str().into(),
            });
            (key, live)
        };
        tokio::spawn(Arc::clone(self).subscribe(key, target.clone(), live, state));
        watch
    }

    /// Stops following `target`: at once, or once it has lingered.
    pub(super) fn unfollow(&self, target: &Target) {
        let mut current = lock(&self.current);
        let Some(entry) = current.get_mut(target) else {
            return;
        };
        if entry.lingering.is_some() {
            return;
        }
        if self.linger.is_zero() {
            let key = entry.key;
            current.remove(target);
            let _ = self.dispatcher.send(Command::Release { key });
            return;
        }
        // The key is unique: it serves as this linger's ticket.
        let ticket = self.next_key.fetch_add(1, Ordering::Relaxed);
        entry.lingering = Some(ticket);
        let due = Due {
            at: Instant::now() + self.linger,
            target: target.clone(),
            current: *entry,
        };
        self.metrics.nats_lingering.inc();
        let _ = self.dispatcher.send(Command::Linger { key: entry.key });
        drop(current);
        let mut queue = lock(&self.due);
        queue.push_back(due);
        if queue.len() == 1 {
            self.due_added.notify_one();
        }
    }

    /// Releases lingering follows whose time is up, until `stop`.
    pub(super) async fn release_when_due(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let next = lock(&self.due).front().map(|due| due.at);
            let wait = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => self.due_added.notified().await,
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = wait => {}
            }
            let now = Instant::now();
            loop {
                let due = {
                    let mut queue = lock(&self.due);
                    match queue.front() {
                        Some(due) if due.at <= now => queue.pop_front(),
                        _ => None,
                    }
                };
                let Some(due) = due else { break };
                let mut current = lock(&self.current);
                // Unless taken over (or lingering again, with another ticket).
                if current.get(&due.target) == Some(&due.current) {
                    current.remove(&due.target);
                    self.metrics.nats_lingering.dec();
                    let _ = self.dispatcher.send(Command::Release {
                        key: due.current.key,
                    });
                }
            }
        }
    }

    /// What a stream of `targets` at `from` missed, from the events recorded
    /// while they lingered; `None` when the record cannot tell (or nothing
    /// lingers here): the stream is read.
    pub(super) async fn recorded(
        &self,
        targets: &[Target],
        from: &StreamPosition,
        limit: usize,
    ) -> Option<Kept> {
        let asked = {
            let current = lock(&self.current);
            targets
                .iter()
                .zip(&from.seqs)
                .map(|(target, &after)| {
                    current
                        .get(target)
                        .filter(|entry| entry.revived)
                        .map(|entry| (entry.key, after))
                })
                .collect::<Option<Vec<_>>>()?
        };
        let (reply, answer) = oneshot::channel();
        self.dispatcher
            .send(Command::Recent {
                asked,
                epoch: from.epoch,
                limit,
                reply,
            })
            .ok()?;
        let kept = answer.await.ok().flatten()?;
        self.metrics.nats_recorded_replays.inc();
        Some(kept)
    }

    /// Whether the follow `key` is still `target`'s current one.
    fn is_current(&self, target: &Target, key: u64) -> bool {
        lock(&self.current)
            .get(target)
            .is_some_and(|entry| entry.key == key)
    }

    /// Subscribes to the target's live copies, then anchors its chain at the
    /// newest stored event: once the server has the subscription, every
    /// later event arrives live; what came before is the replay's business.
    async fn subscribe(
        self: Arc<Self>,
        key: u64,
        target: Target,
        live: String,
        state: watch::Sender<FollowState>,
    ) {
        if !self.is_current(&target, key) {
            // Released before it started.
            return;
        }
        let stored = target.subject(&self.subject_prefix);
        let setup = async {
            let subscription = self
                .client
                .subscribe_with_sender(live, self.copies.clone())
                .await?;
            self.client.flush().await?;
            // Read before the anchor: an anchor read while the history
            // changed is taken again.
            let epoch = self.store.epoch();
            let anchor = self.store.anchor_of(&stored).await?;
            Ok::<_, FollowError>((subscription, epoch, anchor))
        };
        match setup.await {
            Ok((subscription, epoch, anchor)) => {
                let _ = self.dispatcher.send(Command::Anchored {
                    key,
                    subscription,
                    epoch,
                    anchor,
                    state,
                });
            }
            Err(error) => {
                {
                    // Forgotten here first: a stream that follows the target
                    // again sets it up anew instead of taking this one over.
                    let mut current = lock(&self.current);
                    if let Some(entry) = current.get(&target).copied() {
                        if entry.key == key {
                            current.remove(&target);
                            if entry.lingering.is_some() {
                                self.metrics.nats_lingering.dec();
                            }
                        }
                    }
                    let _ = self.dispatcher.send(Command::SetUpFailed { key });
                }
                let _ = state.send(FollowState::Failed(Arc::new(error)));
            }
        }
    }
}
