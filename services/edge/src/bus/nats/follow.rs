//! Following targets: which targets the node follows, and setting up each
//! follow (subscribe, then anchor the chain) before the dispatcher takes it.
//!
//! Each follow gets a key; the dispatcher only adopts a subscription whose
//! key is still its target's current follow, so an unfollow racing a follow
//! never leaves a stale subscription delivering.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use herald_protocol::Target;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

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

/// One follow of a target: its key, and what cancels its setting up.
struct Follow {
    key: u64,
    stop: CancellationToken,
}

/// The targets this node follows.
pub(super) struct Followers {
    client: async_nats::Client,
    store: Arc<Store>,
    live_prefix: String,
    subject_prefix: String,
    current: Mutex<HashMap<Target, Follow>>,
    next_key: AtomicU64,
    dispatcher: mpsc::UnboundedSender<Command>,
}

impl Followers {
    pub(super) fn new(
        client: async_nats::Client,
        store: Arc<Store>,
        live_prefix: String,
        subject_prefix: String,
        dispatcher: mpsc::UnboundedSender<Command>,
    ) -> Self {
        Followers {
            client,
            store,
            live_prefix,
            subject_prefix,
            current: Mutex::new(HashMap::new()),
            next_key: AtomicU64::new(1),
            dispatcher,
        }
    }

    /// Starts following `target`; the watch turns ready once the dispatcher
    /// delivers it.
    pub(super) fn follow(self: &Arc<Self>, target: &Target) -> watch::Receiver<FollowState> {
        let (state, watch) = watch::channel(FollowState::Pending);
        let stop = CancellationToken::new();
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let previous = lock(&self.current).insert(
            target.clone(),
            Follow {
                key,
                stop: stop.clone(),
            },
        );
        if let Some(previous) = previous {
            self.release(previous);
        }
        tokio::spawn(Arc::clone(self).subscribe(key, target.clone(), stop, state));
        watch
    }

    /// Stops following `target`.
    pub(super) fn unfollow(&self, target: &Target) {
        let removed = lock(&self.current).remove(target);
        if let Some(follow) = removed {
            self.release(follow);
        }
    }

    /// Whether the follow `key` is still `target`'s current one.
    pub(super) fn is_current(&self, target: &Target, key: u64) -> bool {
        lock(&self.current)
            .get(target)
            .is_some_and(|follow| follow.key == key)
    }

    fn release(&self, follow: Follow) {
        follow.stop.cancel();
        let _ = self.dispatcher.send(Command::Release { key: follow.key });
    }

    /// Subscribes to the target's live copies, then anchors its chain at the
    /// newest stored event: once the server has the subscription, every
    /// later event arrives live; what came before is the replay's business.
    async fn subscribe(
        self: Arc<Self>,
        key: u64,
        target: Target,
        stop: CancellationToken,
        state: watch::Sender<FollowState>,
    ) {
        let live = target.subject(&self.live_prefix);
        let stored = target.subject(&self.subject_prefix);
        let setup = async {
            let subscription = self.client.subscribe(live).await?;
            self.client.flush().await?;
            let anchor = self
                .store
                .last_of(&stored)
                .await?
                .map(|message| message.link())
                .unwrap_or_default();
            Ok::<_, FollowError>((subscription, anchor))
        };
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            result = setup => result,
        };
        match result {
            Ok((subscription, anchor)) => {
                let _ = self.dispatcher.send(Command::Adopt {
                    key,
                    target,
                    subscription,
                    anchor,
                    state,
                });
            }
            Err(error) => {
                let _ = state.send(FollowState::Failed(Arc::new(error)));
            }
        }
    }
}
