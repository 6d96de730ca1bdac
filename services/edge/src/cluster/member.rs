//! What a node gossips about itself, and the cluster as one node sees it.
//!
//! Pure data and rules, no I/O: [`NodeInfo`] is the node's key/value state in
//! gossip (a few hundred bytes, so a datagram never fragments), and
//! [`ClusterView::new`] turns what the failure detector observed into the
//! members of `GET /v1/cluster`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;

/// Gossip keys (short: they travel in every state delta).
mod key {
    pub(super) const HTTP: &str = "http";
    pub(super) const VERSION: &str = "version";
    pub(super) const STARTED: &str = "started";
    pub(super) const CONNECTIONS: &str = "conns";
    pub(super) const USERS: &str = "users";
    pub(super) const DRAINING: &str = "draining";
    pub(super) const READY: &str = "ready";
    pub(super) const LEFT: &str = "left";
}

/// What a node tells its peers about itself (public so that tests can gossip
/// a realistic state from a node that is not Herald).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// URL of its HTTP listener.
    pub http: String,
    /// Herald version it runs.
    pub version: String,
    /// Start time, Unix milliseconds.
    pub started_at_ms: u64,
    /// Open SSE streams.
    pub connections: u64,
    /// Users with at least one stream there.
    pub users: u64,
    /// It refuses new streams and is closing the open ones.
    pub draining: bool,
    /// Its `/readyz` would answer 200.
    pub ready: bool,
    /// It announced that it is leaving the cluster (SIGTERM).
    pub left: bool,
}

impl NodeInfo {
    /// The gossip key/value pairs for this state.
    pub fn to_key_values(&self) -> Vec<(String, String)> {
        let flag = |on: bool| if on { "1" } else { "0" }.to_string();
        vec![
            (key::HTTP.into(), self.http.clone()),
            (key::VERSION.into(), self.version.clone()),
            (key::STARTED.into(), self.started_at_ms.to_string()),
            (key::CONNECTIONS.into(), self.connections.to_string()),
            (key::USERS.into(), self.users.to_string()),
            (key::DRAINING.into(), flag(self.draining)),
            (key::READY.into(), flag(self.ready)),
            (key::LEFT.into(), flag(self.left)),
        ]
    }

    /// Reads a peer's key/value pairs. A peer is not trusted to be well-formed:
    /// an unknown key is ignored, an unreadable number counts as 0.
    pub(crate) fn from_key_values<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut info = NodeInfo::default();
        let number = |value: &str| value.parse::<u64>().unwrap_or(0);
        for (name, value) in pairs {
            match name {
                key::HTTP => info.http = value.chars().take(256).collect(),
                key::VERSION => info.version = value.chars().take(64).collect(),
                key::STARTED => info.started_at_ms = number(value),
                key::CONNECTIONS => info.connections = number(value),
                key::USERS => info.users = number(value),
                key::DRAINING => info.draining = value == "1",
                key::READY => info.ready = value == "1",
                key::LEFT => info.left = value == "1",
                _ => {}
            }
        }
        info
    }
}

/// A member's state as this node sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Heard from recently (the failure detector trusts it).
    Alive,
    /// Not heard from for longer than the failure detector accepts.
    Suspect,
    /// Suspect for longer than `gossip.dead_after_ms`.
    Dead,
    /// It announced its departure (it is draining or gone).
    Left,
}

impl MemberState {
    /// Every state, for metrics that report each (also at zero).
    pub const ALL: [MemberState; 4] = [
        MemberState::Alive,
        MemberState::Suspect,
        MemberState::Dead,
        MemberState::Left,
    ];

    /// Stable name for JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Dead => "dead",
            MemberState::Left => "left",
        }
    }
}

/// One node as the failure detector observed it.
#[derive(Debug, Clone)]
pub(crate) struct Observation {
    /// Its node id.
    pub(crate) id: String,
    /// Its start generation (a restarted node is a new member).
    pub(crate) generation: u64,
    /// Where it gossips.
    pub(crate) gossip: SocketAddr,
    /// What it said about itself.
    pub(crate) info: NodeInfo,
    /// The failure detector considers it alive.
    pub(crate) live: bool,
    /// Time since its heartbeat last advanced.
    pub(crate) last_heard: Duration,
    /// It is this node.
    pub(crate) is_self: bool,
}

impl Observation {
    /// Its state: a departure it announced wins; then the failure detector's
    /// verdict; a suspect becomes dead after `dead_after` without news.
    pub(crate) fn state(&self, dead_after: Duration) -> MemberState {
        if self.info.left {
            MemberState::Left
        } else if self.live || self.is_self {
            MemberState::Alive
        } else if self.last_heard >= dead_after {
            MemberState::Dead
        } else {
            MemberState::Suspect
        }
    }
}

/// One member in `GET /v1/cluster`.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    /// Node id.
    pub id: String,
    /// `alive`, `suspect`, `dead` or `left`.
    pub state: MemberState,
    /// URL of its HTTP listener.
    pub http: String,
    /// Where it gossips.
    pub gossip: String,
    /// Herald version.
    pub version: String,
    /// Start generation (microseconds since the Unix epoch at start).
    pub generation: u64,
    /// Open SSE streams (as last gossiped).
    pub connections: u64,
    /// Users held (as last gossiped).
    pub users: u64,
    /// Refusing new streams, closing open ones.
    pub draining: bool,
    /// Would accept new streams.
    pub ready: bool,
    /// Milliseconds since its heartbeat last advanced (0 for this node).
    pub last_heard_ms: u64,
    /// This is the node that answered.
    #[serde(rename = "self")]
    pub is_self: bool,
}

/// Cluster-wide sums over the members.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Totals {
    /// Members listed.
    pub members: usize,
    /// Members by state.
    pub alive: usize,
    /// Members by state.
    pub suspect: usize,
    /// Members by state.
    pub dead: usize,
    /// Members by state.
    pub left: usize,
    /// Streams on members that are not dead.
    pub connections: u64,
    /// Users held on members that are not dead (a user with streams on two
    /// nodes counts twice).
    pub users: u64,
}

/// The cluster as this node sees it: the body of `GET /v1/cluster`.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterView {
    /// Gossip cluster id.
    pub cluster_id: String,
    /// The answering node.
    pub node: String,
    /// Whether gossip runs on this node.
    pub gossip: bool,
    /// Every known member, this node included, by id.
    pub members: Vec<Member>,
    /// Sums over the members.
    pub totals: Totals,
}

impl ClusterView {
    /// Builds the view from observations. When a node id appears with several
    /// generations (it restarted), only one is a member: this node's own
    /// incarnation, else one the failure detector finds live and that has not
    /// left, else the newest. Generations are wall-clock start times, so a
    /// node restarted after its clock was stepped back (an NTP correction)
    /// has a lower generation than the incarnation it replaces; by generation
    /// alone every node, itself included, would list it as `left` until
    /// `gossip.forget_after_secs`.
    pub(crate) fn new(
        cluster_id: &str,
        node: &str,
        gossip: bool,
        mut observations: Vec<Observation>,
        dead_after: Duration,
    ) -> Self {
        let current = |o: &Observation| (o.is_self, o.live && !o.info.left);
        observations.sort_by(|a, b| {
            a.id.cmp(&b.id)
                .then(current(b).cmp(&current(a)))
                .then(b.generation.cmp(&a.generation))
        });
        observations.dedup_by(|later, first| later.id == first.id);
        let members: Vec<Member> = observations
            .into_iter()
            .map(|observation| Member {
                state: observation.state(dead_after),
                last_heard_ms: observation.last_heard.as_millis() as u64,
                gossip: observation.gossip.to_string(),
                generation: observation.generation,
                is_self: observation.is_self,
                connections: observation.info.connections,
                users: observation.info.users,
                draining: observation.info.draining,
                ready: observation.info.ready,
                http: observation.info.http,
                version: observation.info.version,
                id: observation.id,
            })
            .collect();
        let mut totals = Totals {
            members: members.len(),
            ..Totals::default()
        };
        for member in &members {
            match member.state {
                MemberState::Alive => totals.alive += 1,
                MemberState::Suspect => totals.suspect += 1,
                MemberState::Dead => totals.dead += 1,
                MemberState::Left => totals.left += 1,
            }
            if member.state != MemberState::Dead {
                totals.connections += member.connections;
                totals.users += member.users;
            }
        }
        ClusterView {
            cluster_id: cluster_id.to_string(),
            node: node.to_string(),
            gossip,
            members,
            totals,
        }
    }

    /// Members that take new streams: alive, ready and not draining.
    pub fn serving(&self) -> impl Iterator<Item = &Member> {
        self.members
            .iter()
            .filter(|m| m.state == MemberState::Alive && m.ready && !m.draining)
    }

    /// Members in `state`.
    pub fn count(&self, state: MemberState) -> usize {
        self.members.iter().filter(|m| m.state == state).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEAD_AFTER: Duration = Duration::from_secs(30);

    fn observed(id: &str, generation: u64, live: bool, last_heard_secs: u64) -> Observation {
        Observation {
            id: id.into(),
            generation,
            gossip: "127.0.0.1:7946".parse().expect("addr"),
            info: NodeInfo {
                http: format!("http://{id}:8080"),
                connections: 10,
                users: 4,
                ready: true,
                ..NodeInfo::default()
            },
            live,
            last_heard: Duration::from_secs(last_heard_secs),
            is_self: false,
        }
    }

    #[test]
    fn node_info_survives_a_round_trip_through_gossip_keys() {
        let info = NodeInfo {
            http: "http://edge-1:8080".into(),
            version: "0.1.0".into(),
            started_at_ms: 1_790_000_000_000,
            connections: 12_345,
            users: 678,
            draining: true,
            ready: false,
            left: true,
        };
        let pairs = info.to_key_values();
        let read = NodeInfo::from_key_values(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        assert_eq!(read, info);
        let bytes: usize = pairs.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(bytes < 200, "gossiped state stays small: {bytes} bytes");
    }

    #[test]
    fn garbage_from_a_peer_reads_as_zero_and_is_never_a_panic() {
        let info = NodeInfo::from_key_values([
            ("conns", "-5"),
            ("users", "lots"),
            ("started", "99999999999999999999999"),
            ("draining", "yes"),
            ("unknown", "x"),
        ]);
        assert_eq!(info.connections, 0);
        assert_eq!(info.users, 0);
        assert_eq!(info.started_at_ms, 0);
        assert!(!info.draining);
    }

    #[test]
    fn a_member_is_alive_then_suspect_then_dead_and_left_wins() {
        assert_eq!(
            observed("a", 1, true, 0).state(DEAD_AFTER),
            MemberState::Alive
        );
        assert_eq!(
            observed("a", 1, false, 5).state(DEAD_AFTER),
            MemberState::Suspect
        );
        assert_eq!(
            observed("a", 1, false, 30).state(DEAD_AFTER),
            MemberState::Dead
        );
        let mut leaving = observed("a", 1, true, 0);
        leaving.info.left = true;
        assert_eq!(leaving.state(DEAD_AFTER), MemberState::Left);
        let mut itself = observed("a", 1, false, 100);
        itself.is_self = true;
        assert_eq!(itself.state(DEAD_AFTER), MemberState::Alive);
    }

    #[test]
    fn a_restarted_node_is_listed_once_with_its_newest_generation() {
        let view = ClusterView::new(
            "herald",
            "b",
            true,
            vec![
                observed("a", 1, false, 40),
                observed("b", 7, true, 0),
                observed("a", 2, true, 0),
            ],
            DEAD_AFTER,
        );
        let ids: Vec<(&str, u64)> = view
            .members
            .iter()
            .map(|m| (m.id.as_str(), m.generation))
            .collect();
        assert_eq!(ids, [("a", 2), ("b", 7)]);
        assert_eq!(view.totals.alive, 2);
        assert_eq!(view.totals.dead, 0);
    }

    #[test]
    fn a_node_restarted_with_its_clock_stepped_back_is_listed_with_its_live_generation() {
        // Generation 9 ran with a clock ahead and left; generation 5 is the
        // same node restarted after the clock was corrected.
        let mut before = observed("a", 9, true, 0);
        before.info.left = true;
        let view = ClusterView::new(
            "herald",
            "b",
            true,
            vec![before, observed("a", 5, true, 0), observed("b", 1, true, 0)],
            DEAD_AFTER,
        );
        let ids: Vec<(&str, u64, MemberState)> = view
            .members
            .iter()
            .map(|m| (m.id.as_str(), m.generation, m.state))
            .collect();
        assert_eq!(
            ids,
            [("a", 5, MemberState::Alive), ("b", 1, MemberState::Alive)]
        );
        assert_eq!(view.totals.left, 0);

        // A crashed higher generation the detector has given up on.
        let view = ClusterView::new(
            "herald",
            "b",
            true,
            vec![observed("a", 9, false, 40), observed("a", 5, true, 0)],
            DEAD_AFTER,
        );
        assert_eq!(view.members[0].generation, 5);
        assert_eq!(view.members[0].state, MemberState::Alive);

        // The node itself lists its own incarnation, even before the failure
        // detector has an opinion of the older one.
        let mut itself = observed("a", 5, false, 0);
        itself.is_self = true;
        let view = ClusterView::new(
            "herald",
            "a",
            true,
            vec![observed("a", 9, true, 0), itself],
            DEAD_AFTER,
        );
        assert_eq!(view.members.len(), 1);
        assert!(view.members[0].is_self);
        assert_eq!(view.members[0].generation, 5);
    }

    #[test]
    fn totals_count_states_and_leave_out_the_load_of_dead_members() {
        let mut draining = observed("c", 1, true, 0);
        draining.info.draining = true;
        let view = ClusterView::new(
            "herald",
            "a",
            true,
            vec![
                observed("a", 1, true, 0),
                observed("b", 1, false, 3),
                draining,
                observed("d", 1, false, 60),
            ],
            DEAD_AFTER,
        );
        assert_eq!(
            view.totals,
            Totals {
                members: 4,
                alive: 2,
                suspect: 1,
                dead: 1,
                left: 0,
                connections: 30,
                users: 12,
            }
        );
        let serving: Vec<&str> = view.serving().map(|m| m.id.as_str()).collect();
        assert_eq!(serving, ["a"]);
    }
}
