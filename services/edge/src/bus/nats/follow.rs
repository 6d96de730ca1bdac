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
//! [`Client::subscribe_with_sender`]: async_nats::Client::subscribe_with_sender

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use herald_protocol::Target;
use tokio::sync::{mpsc, watch};

use super::dispatcher::Command;
use super::lock;
use super::store::{ReadError, Store};
use crate::bus::FollowState;

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

/// The targets this node follows.
pub(super) struct Followers {
    client: async_nats::Client,
    store: Arc<Store>,
    live_prefix: String,
    subject_prefix: String,
    /// Each followed target's current follow key.
    current: Mutex<HashMap<Target, u64>>,
    next_key: AtomicU64,
    dispatcher: mpsc::UnboundedSender<Command>,
    /// Where every live subscription delivers (the dispatcher reads it).
    copies: mpsc::Sender<async_nats::Message>,
}

impl Followers {
    pub(super) fn new(
        client: async_nats::Client,
        store: Arc<Store>,
        live_prefix: String,
        subject_prefix: String,
        dispatcher: mpsc::UnboundedSender<Command>,
        copies: mpsc::Sender<async_nats::Message>,
    ) -> Self {
        Followers {
            client,
            store,
            live_prefix,
            subject_prefix,
            current: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
            dispatcher,
            copies,
        }
    }

    /// Starts following `target`; the watch turns ready once the dispatcher
    /// delivers it.
    pub(super) fn follow(self: &Arc<Self>, target: &Target) -> watch::Receiver<FollowState> {
        let (state, watch) = watch::channel(FollowState::Pending);
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let live = target.subject(&self.live_prefix);
        {
            let mut current = lock(&self.current);
            if let Some(previous) = current.insert(target.clone(), key) {
                let _ = self.dispatcher.send(Command::Release { key: previous });
            }
            // Before the subscription exists: its first copy finds its route.
            let _ = self.dispatcher.send(Command::Follow {
                key,
                target: target.clone(),
                live: live.as_str().into(),
            });
        }
        tokio::spawn(Arc::clone(self).subscribe(key, target.clone(), live, state));
        watch
    }

    /// Stops following `target`.
    pub(super) fn unfollow(&self, target: &Target) {
        let mut current = lock(&self.current);
        if let Some(key) = current.remove(target) {
            let _ = self.dispatcher.send(Command::Release { key });
        }
    }

    /// Whether the follow `key` is still `target`'s current one.
    fn is_current(&self, target: &Target, key: u64) -> bool {
        lock(&self.current).get(target) == Some(&key)
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
            let anchor = self
                .store
                .last_of(&stored)
                .await?
                .map(|message| message.link())
                .unwrap_or_default();
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
                let _ = self.dispatcher.send(Command::SetUpFailed { key });
                let _ = state.send(FollowState::Failed(Arc::new(error)));
            }
        }
    }
}
