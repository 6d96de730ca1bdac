//! The connection registry: which SSE connections this node holds, by target.
//!
//! A sharded [`DashMap`] maps each [`Target`] (a user or a topic) to the local
//! connections that follow it. The first connection for a target makes the node
//! follow it on the bus; the last one to leave unfollows it and removes the
//! entry, so an idle node holds no state for users who left. Both happen under
//! the map's lock for that target, so follow and unfollow of one target never
//! cross.
//!
//! Live events arrive through [`LiveSink::deliver`]: the registry looks up the
//! target once and offers the event's shared frame (a [`Bytes`](bytes::Bytes) clone, no copy)
//! to each connection's bounded queue without waiting. A connection whose queue
//! is full is too slow: it is cut loose through its [`Kill`] switch and resumes
//! from its last id when it reconnects.

mod connection;
mod queue;

pub(crate) use connection::{
    ConnectionHandle, DisconnectReason, Frame, Kill, Notice, Queued, QueuedAt,
};
pub(crate) use queue::QueueReader;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use herald_protocol::{EventId, Target, TargetKind};
use tokio::sync::watch;

use crate::bus::{Event, FollowState, Interest, LiveSink};
use crate::metrics::Metrics;

/// Limits the registry enforces when a connection attaches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RegistryLimits {
    /// Most connections on this node.
    pub(crate) max_connections: usize,
    /// Most connections of one user on this node.
    pub(crate) max_connections_per_user: usize,
}

/// Why a connection could not attach. Nothing was registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AttachError {
    /// The node holds `max_connections` already.
    #[error("this node holds its maximum of {0} streams")]
    NodeFull(usize),
    /// The user holds `max_connections_per_user` streams on this node already.
    #[error("this user already holds the maximum of {0} streams")]
    UserFull(usize),
}

/// One connection following a target.
struct Follower {
    connection: Arc<ConnectionHandle>,
    /// The index of the target in the connection's target list.
    slot: u32,
    /// Whether the connection follows other targets too (only then does a
    /// target's progress move its id).
    with_others: bool,
}

struct TargetEntry {
    /// Connection id → the connection following this target.
    connections: HashMap<u64, Follower>,
    /// The bus's follow; once a stream found it ready, the registry's shared
    /// ready watch (see [`Registry::followed`]).
    follow: watch::Receiver<FollowState>,
}

/// Every SSE connection this node holds, by target.
pub(crate) struct Registry {
    targets: DashMap<Target, TargetEntry>,
    connections: AtomicUsize,
    users: AtomicUsize,
    next_id: AtomicU64,
    limits: RegistryLimits,
    metrics: Arc<Metrics>,
    /// Always ready: what a target whose follow is ready keeps.
    ready: watch::Receiver<FollowState>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("targets", &self.targets.len())
            .field("connections", &self.connection_count())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub(crate) fn new(limits: RegistryLimits, metrics: Arc<Metrics>) -> Self {
        Registry {
            targets: DashMap::new(),
            connections: AtomicUsize::new(0),
            users: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            limits,
            metrics,
            ready: watch::channel(FollowState::Ready).1,
        }
    }

    /// A stream found live delivery of `targets` ready: a ready follow never
    /// changes again, so each target keeps the shared ready watch instead of
    /// its follow's own channel (one allocation less per followed target;
    /// later streams see it ready just the same).
    pub(crate) fn followed(&self, targets: &[Target]) {
        for target in targets {
            if let Some(mut entry) = self.targets.get_mut(target) {
                if matches!(*entry.follow.borrow(), FollowState::Ready)
                    && !entry.follow.same_channel(&self.ready)
                {
                    entry.follow = self.ready.clone();
                }
            }
        }
    }

    /// A fresh connection id, unique on this node.
    pub(crate) fn next_connection_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Open connections on this node.
    pub(crate) fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Targets with at least one local connection (what the node follows).
    pub(crate) fn target_count(&self) -> usize {
        self.targets.len()
    }

    /// Open streams of `target` on this node.
    pub(crate) fn connections_of(&self, target: &Target) -> usize {
        self.targets
            .get(target)
            .map_or(0, |entry| entry.connections.len())
    }

    /// Users with at least one local connection.
    pub(crate) fn user_count(&self) -> usize {
        self.users.load(Ordering::Relaxed)
    }

    /// Asks up to `count` streams, chosen at random, to move to another node
    /// (see [`ConnectionHandle::ask_to_move`]). Returns how many were asked.
    /// Costs one pass over the registry.
    pub(crate) fn move_streams(&self, count: usize) -> usize {
        if count == 0 {
            return 0;
        }
        // Reservoir sampling over every connection, each counted once through
        // its user's entry.
        let mut chosen: Vec<Arc<ConnectionHandle>> = Vec::with_capacity(count);
        let mut seen = 0usize;
        for entry in self.targets.iter() {
            if entry.key().kind() != TargetKind::User {
                continue;
            }
            for Follower { connection, .. } in entry.connections.values() {
                seen += 1;
                if chosen.len() < count {
                    chosen.push(Arc::clone(connection));
                } else {
                    let pick = fastrand::usize(0..seen);
                    if pick < count {
                        chosen[pick] = Arc::clone(connection);
                    }
                }
            }
        }
        chosen.iter().filter(|c| c.ask_to_move()).count()
    }

    /// Asks every stream to end behind what is queued and resume (see
    /// [`ConnectionHandle::ask_to_leave_for_history`]). Returns how many.
    pub(crate) fn end_streams_for_history(&self) -> usize {
        let mut asked = 0;
        for entry in self.targets.iter() {
            if entry.key().kind() != TargetKind::User {
                continue;
            }
            for Follower { connection, .. } in entry.connections.values() {
                connection.ask_to_leave_for_history();
                asked += 1;
            }
        }
        asked
    }

    /// Asks every stream of `user` on this node to end for `reason` (see
    /// [`ConnectionHandle::ask_to_end`]), writing `notice` first when given.
    /// Returns how many were asked; a topic target ends nothing.
    pub(crate) fn end_streams_of(
        &self,
        user: &Target,
        reason: DisconnectReason,
        notice: Option<&Arc<bytes::Bytes>>,
    ) -> usize {
        if user.kind() != TargetKind::User {
            return 0;
        }
        let Some(entry) = self.targets.get(user) else {
            return 0;
        };
        for Follower { connection, .. } in entry.connections.values() {
            connection.ask_to_end(reason, notice);
        }
        entry.connections.len()
    }

    /// Events waiting in all connection queues (each connection counted once,
    /// through its user's entry). Costs one pass over the registry.
    pub(crate) fn queued_events(&self) -> usize {
        self.targets
            .iter()
            .filter(|entry| entry.key().kind() == TargetKind::User)
            .map(|entry| {
                entry
                    .connections
                    .values()
                    .map(|follower| follower.connection.queued())
                    .sum::<usize>()
            })
            .sum()
    }

    /// Registers `connection` for every target in `targets` (its user first),
    /// following newly held targets on the bus. Returns one watch per target
    /// that turns ready when live delivery for it is active.
    pub(crate) fn attach(
        &self,
        connection: &Arc<ConnectionHandle>,
        targets: &[Target],
        interest: &dyn Interest,
    ) -> Result<Vec<watch::Receiver<FollowState>>, AttachError> {
        let total = self.connections.fetch_add(1, Ordering::AcqRel);
        if total >= self.limits.max_connections {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(AttachError::NodeFull(self.limits.max_connections));
        }
        let mut follows = Vec::with_capacity(targets.len());
        for (index, target) in targets.iter().enumerate() {
            let mut entry = self.targets.entry(target.clone()).or_insert_with(|| {
                if target.kind() == TargetKind::User {
                    self.users.fetch_add(1, Ordering::Relaxed);
                }
                TargetEntry {
                    connections: HashMap::new(),
                    follow: interest.follow(target),
                }
            });
            if target.kind() == TargetKind::User
                && entry.connections.len() >= self.limits.max_connections_per_user
            {
                drop(entry);
                self.detach_targets(connection.id, &targets[..index], interest);
                self.remove_if_empty(target, interest);
                self.connections.fetch_sub(1, Ordering::AcqRel);
                return Err(AttachError::UserFull(self.limits.max_connections_per_user));
            }
            entry.connections.insert(
                connection.id,
                Follower {
                    connection: Arc::clone(connection),
                    slot: index as u32,
                    with_others: targets.len() > 1,
                },
            );
            follows.push(entry.follow.clone());
        }
        self.metrics
            .connections_open
            .set(self.connection_count() as i64);
        Ok(follows)
    }

    /// Removes the connection from its targets, unfollowing targets left empty.
    pub(crate) fn detach(&self, connection_id: u64, targets: &[Target], interest: &dyn Interest) {
        self.detach_targets(connection_id, targets, interest);
        self.connections.fetch_sub(1, Ordering::AcqRel);
        self.metrics
            .connections_open
            .set(self.connection_count() as i64);
    }

    fn detach_targets(&self, connection_id: u64, targets: &[Target], interest: &dyn Interest) {
        for target in targets {
            if let Some(mut entry) = self.targets.get_mut(target) {
                entry.connections.remove(&connection_id);
            }
            self.remove_if_empty(target, interest);
        }
    }

    fn remove_if_empty(&self, target: &Target, interest: &dyn Interest) {
        // remove_if holds the shard lock, so a concurrent attach either lands
        // before (and the entry stays) or after (and follows anew).
        let removed = self.targets.remove_if(target, |target, entry| {
            let empty = entry.connections.is_empty();
            if empty {
                interest.unfollow(target);
            }
            empty
        });
        if removed.is_some() && target.kind() == TargetKind::User {
            self.users.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl LiveSink for Registry {
    fn deliver(&self, event: &Arc<Event>) {
        let Some(entry) = self.targets.get(&event.target) else {
            return;
        };
        let queued_at = QueuedAt::now();
        for follower in entry.connections.values() {
            follower.connection.offer(Frame {
                event: Arc::clone(event),
                slot: follower.slot,
                queued_at,
            });
        }
    }

    fn progress(&self, target: &Target, through: EventId) {
        let Some(entry) = self.targets.get(target) else {
            return;
        };
        for follower in entry.connections.values() {
            if follower.with_others {
                follower
                    .connection
                    .offer_progress(follower.slot, through.seq);
            }
        }
    }

    fn history_changed(&self) {
        let streams = self.end_streams_for_history();
        tracing::warn!(
            streams,
            "the stored history changed: every stream resumes and is told with herald.reset"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct CountingInterest {
        followed: Mutex<Vec<Target>>,
        unfollowed: Mutex<Vec<Target>>,
    }

    impl Interest for CountingInterest {
        fn follow(&self, target: &Target) -> watch::Receiver<FollowState> {
            self.followed.lock().expect("lock").push(target.clone());
            watch::channel(FollowState::Ready).1
        }
        fn unfollow(&self, target: &Target) {
            self.unfollowed.lock().expect("lock").push(target.clone());
        }
    }

    fn registry(max_connections: usize, max_per_user: usize) -> Registry {
        Registry::new(
            RegistryLimits {
                max_connections,
                max_connections_per_user: max_per_user,
            },
            Arc::new(Metrics::default()),
        )
    }

    fn connection(registry: &Registry, capacity: usize) -> (Arc<ConnectionHandle>, QueueReader) {
        ConnectionHandle::new(
            registry.next_connection_id(),
            capacity,
            Kill::new(),
            Arc::new(Metrics::default()),
        )
    }

    fn event(target: &Target, seq: u64) -> Arc<Event> {
        Arc::new(Event::new(
            herald_protocol::EventId {
                epoch: herald_protocol::Epoch(1),
                seq,
            },
            target.clone(),
            None,
            "x",
            std::time::SystemTime::now(),
        ))
    }

    #[test]
    fn a_target_is_followed_once_and_unfollowed_after_its_last_connection() {
        let registry = registry(10, 10);
        let interest = CountingInterest::default();
        let alice = Target::user("alice").expect("valid");
        let (a, _qa) = connection(&registry, 4);
        let (b, _qb) = connection(&registry, 4);
        registry
            .attach(&a, std::slice::from_ref(&alice), &interest)
            .expect("attached");
        registry
            .attach(&b, std::slice::from_ref(&alice), &interest)
            .expect("attached");
        assert_eq!(interest.followed.lock().expect("lock").len(), 1);

        registry.detach(a.id, std::slice::from_ref(&alice), &interest);
        assert!(interest.unfollowed.lock().expect("lock").is_empty());
        registry.detach(b.id, std::slice::from_ref(&alice), &interest);
        assert_eq!(*interest.unfollowed.lock().expect("lock"), vec![alice]);
        assert_eq!(registry.target_count(), 0);
        assert_eq!(registry.connection_count(), 0);
    }

    #[test]
    fn events_reach_only_the_connections_of_their_target() {
        let registry = registry(10, 10);
        let interest = CountingInterest::default();
        let alice = Target::user("alice").expect("valid");
        let bob = Target::user("bob").expect("valid");
        let (a, mut qa) = connection(&registry, 4);
        let (b, mut qb) = connection(&registry, 4);
        registry
            .attach(&a, std::slice::from_ref(&alice), &interest)
            .expect("attached");
        registry
            .attach(&b, std::slice::from_ref(&bob), &interest)
            .expect("attached");
        registry.deliver(&event(&alice, 1));
        let Some(Queued::Event(frame)) = qa.try_recv() else {
            panic!("alice's connection got no event");
        };
        assert_eq!(frame.event.id.seq, 1);
        assert!(qb.try_recv().is_none());
    }

    #[test]
    fn a_connection_whose_queue_is_full_is_killed_as_slow() {
        let registry = registry(10, 10);
        let interest = CountingInterest::default();
        let alice = Target::user("alice").expect("valid");
        let (a, _qa) = connection(&registry, 2);
        registry
            .attach(&a, std::slice::from_ref(&alice), &interest)
            .expect("attached");
        for seq in 1..=2 {
            registry.deliver(&event(&alice, seq));
        }
        assert!(!a.kill.is_killed());
        registry.deliver(&event(&alice, 3));
        assert!(a.kill.is_killed());
        assert_eq!(a.kill.reason(), Some(DisconnectReason::Slow));
    }

    #[test]
    fn limits_per_node_and_per_user_are_enforced_without_leaking_entries() {
        let registry = registry(3, 2);
        let interest = CountingInterest::default();
        let alice = Target::user("alice").expect("valid");
        let news = Target::topic("news").expect("valid");
        let targets = [alice.clone(), news.clone()];
        let (a, _qa) = connection(&registry, 1);
        let (b, _qb) = connection(&registry, 1);
        let (c, _qc) = connection(&registry, 1);
        registry.attach(&a, &targets, &interest).expect("attached");
        registry.attach(&b, &targets, &interest).expect("attached");
        assert_eq!(
            registry.attach(&c, &targets, &interest).err(),
            Some(AttachError::UserFull(2))
        );
        assert_eq!(registry.connection_count(), 2);

        let bob = Target::user("bob").expect("valid");
        let carol = Target::user("carol").expect("valid");
        let (d, _qd) = connection(&registry, 1);
        registry
            .attach(&d, std::slice::from_ref(&bob), &interest)
            .expect("attached");
        assert_eq!(
            registry
                .attach(&c, std::slice::from_ref(&carol), &interest)
                .err(),
            Some(AttachError::NodeFull(3))
        );
        registry.detach(a.id, &targets, &interest);
        registry.detach(b.id, &targets, &interest);
        registry.detach(d.id, std::slice::from_ref(&bob), &interest);
        assert_eq!(registry.target_count(), 0);
        assert_eq!(registry.connection_count(), 0);
        assert_eq!(registry.user_count(), 0);
    }

    #[test]
    fn users_are_counted_once_however_many_streams_and_topics_they_hold() {
        let registry = registry(10, 10);
        let interest = CountingInterest::default();
        let alice = [
            Target::user("alice").expect("valid"),
            Target::topic("news").expect("valid"),
        ];
        let bob = [Target::user("bob").expect("valid")];
        let (a1, _q1) = connection(&registry, 1);
        let (a2, _q2) = connection(&registry, 1);
        let (b, _q3) = connection(&registry, 1);
        registry.attach(&a1, &alice, &interest).expect("attached");
        registry.attach(&a2, &alice, &interest).expect("attached");
        registry.attach(&b, &bob, &interest).expect("attached");
        assert_eq!(registry.user_count(), 2);
        registry.detach(a1.id, &alice, &interest);
        assert_eq!(registry.user_count(), 2);
        registry.detach(a2.id, &alice, &interest);
        assert_eq!(registry.user_count(), 1);
    }

    #[test]
    fn moving_streams_asks_distinct_connections_after_their_queued_events() {
        let registry = registry(10, 10);
        let interest = CountingInterest::default();
        let alice = Target::user("alice").expect("valid");
        let mut queues = Vec::new();
        let mut handles = Vec::new();
        for user in ["alice", "bob", "carol", "dave"] {
            let target = [Target::user(user).expect("valid")];
            let (handle, queue) = connection(&registry, 4);
            registry
                .attach(&handle, &target, &interest)
                .expect("attached");
            queues.push(queue);
            handles.push(handle);
        }
        registry.deliver(&event(&alice, 1));
        assert_eq!(registry.move_streams(3), 3);
        let moved = Notice::Leave(DisconnectReason::Moved);
        let mut asked = 0;
        for queue in &mut queues {
            let mut items = Vec::new();
            while let Some(item) = queue.try_recv() {
                items.push(item);
            }
            match items.as_slice() {
                [] => {}
                [Queued::Notice(notice)] if **notice == moved => asked += 1,
                [Queued::Event(frame), Queued::Notice(notice)] if **notice == moved => {
                    assert_eq!(frame.event.id.seq, 1);
                    asked += 1;
                }
                [Queued::Event(_)] => {}
                other => panic!("unexpected queue content {other:?}"),
            }
        }
        assert_eq!(asked, 3, "three distinct streams were asked to move");
        assert_eq!(registry.move_streams(0), 0);
    }
}
