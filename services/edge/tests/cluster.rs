//! Gossip membership as operators see it through `GET /v1/cluster`: nodes find
//! each other through seeds, share their load, announce their departure, are
//! suspected when they die, survive a partition, and two clusters never merge.

use std::net::SocketAddr;
use std::time::Duration;

use herald_edge::{ClusterView, MemberState};
use herald_testkit::process::EdgeProcess;
use herald_testkit::udp_relay::{Partition, UdpRelay};
use herald_testkit::{EdgeNode, PATIENCE, SseClient, wait_until};
use serde_json::Value;

const EDGE: &str = env!("CARGO_BIN_EXE_herald-edge");

/// Enough for gossip to converge or a failure to be detected on a loaded CI
/// machine; the targets themselves (3 s, 10 s) are measured by
/// `make bench-membership`, not asserted here.
const GOSSIP_PATIENCE: Duration = Duration::from_secs(30);

/// A node gossiping on a free loopback port, joining through `seeds`.
async fn node(id: &str, seeds: &[SocketAddr], cluster_id: &str) -> EdgeNode {
    let seeds: Vec<String> = seeds.iter().map(ToString::to_string).collect();
    node_seeded_by_name(id, seeds, cluster_id).await
}

/// A node joining through seeds given as text (addresses or DNS names).
async fn node_seeded_by_name(id: &str, seeds: Vec<String>, cluster_id: &str) -> EdgeNode {
    EdgeNode::start(|settings| {
        settings.node.id = Some(id.into());
        settings.gossip.enabled = true;
        settings.gossip.seeds = seeds;
        settings.gossip.cluster_id = cluster_id.into();
        settings.gossip.interval_ms = 200;
    })
    .await
    .expect("node starts")
}

fn gossip_addr(node: &EdgeNode) -> SocketAddr {
    node.handle.gossip_addr().expect("gossip enabled")
}

fn state_of(view: &ClusterView, id: &str) -> Option<MemberState> {
    view.members.iter().find(|m| m.id == id).map(|m| m.state)
}

fn all_alive(view: &ClusterView, ids: &[&str]) -> bool {
    view.members.len() == ids.len()
        && ids
            .iter()
            .all(|id| state_of(view, id) == Some(MemberState::Alive))
}

async fn cluster_json(url: &str) -> Value {
    let response = reqwest::get(url).await.expect("GET /v1/cluster");
    assert_eq!(response.status(), 200);
    response.json().await.expect("JSON body")
}

#[tokio::test]
async fn members_find_each_other_share_their_load_and_a_stopped_node_is_marked_left() {
    let a = node("node-a", &[], "herald").await;
    let b = node("node-b", &[gossip_addr(&a)], "herald").await;
    // A seed can be a DNS name (a Kubernetes headless Service, say).
    let by_name = format!("localhost:{}", gossip_addr(&a).port());
    let c = node_seeded_by_name("node-c", vec![by_name], "herald").await;
    let ids = ["node-a", "node-b", "node-c"];
    for n in [&a, &b, &c] {
        wait_until(
            "every node sees three alive members",
            GOSSIP_PATIENCE,
            || all_alive(&n.handle.cluster(), &ids),
        )
        .await
        .expect("converged");
    }

    // The HTTP view: each member with its address and state, plus totals.
    let body = cluster_json(&b.admin_url("/v1/cluster")).await;
    assert_eq!(body["node"], "node-b");
    assert_eq!(body["totals"]["members"], 3);
    assert_eq!(body["totals"]["alive"], 3);
    let members = body["members"].as_array().expect("members");
    let c_member = members
        .iter()
        .find(|m| m["id"] == "node-c")
        .expect("node-c listed");
    assert_eq!(c_member["state"], "alive");
    assert_eq!(c_member["http"], format!("http://{}", c.addr));
    assert_eq!(c_member["draining"], false);
    assert_eq!(
        members.iter().filter(|m| m["self"] == true).count(),
        1,
        "exactly one member is the answering node"
    );

    // Load is gossiped: a stream opened on C shows up in A's view.
    let _stream = SseClient::open(&c, "alice").await.expect("stream on c");
    wait_until("a sees c's stream", GOSSIP_PATIENCE, || {
        let view = a.handle.cluster();
        view.members
            .iter()
            .any(|m| m.id == "node-c" && m.connections == 1 && m.users == 1)
    })
    .await
    .expect("load gossiped");
    let metrics = a.handle.metrics_text();
    assert!(
        metrics.contains("herald_cluster_members{state=\"alive\"} 3"),
        "{metrics}"
    );

    // A graceful stop announces the departure: `left`, not a failure.
    c.stop().await.expect("c stops");
    for n in [&a, &b] {
        wait_until("c is marked left", GOSSIP_PATIENCE, || {
            state_of(&n.handle.cluster(), "node-c") == Some(MemberState::Left)
        })
        .await
        .expect("left");
    }
    assert_eq!(
        state_of(&a.handle.cluster(), "node-b"),
        Some(MemberState::Alive)
    );
}

#[tokio::test]
async fn clusters_with_different_ids_never_merge() {
    let a = node("a", &[], "blue").await;
    // Both seed to `a` at the same time; only the one of its cluster joins.
    let stranger = node("stranger", &[gossip_addr(&a)], "green").await;
    let friend = node("friend", &[gossip_addr(&a)], "blue").await;
    wait_until("a sees its friend", GOSSIP_PATIENCE, || {
        all_alive(&a.handle.cluster(), &["a", "friend"])
    })
    .await
    .expect("friend joined");
    // Let a few more rounds pass (the friend's own view converging is one).
    wait_until("the friend sees a", GOSSIP_PATIENCE, || {
        all_alive(&friend.handle.cluster(), &["a", "friend"])
    })
    .await
    .expect("friend converged");
    assert_eq!(state_of(&a.handle.cluster(), "stranger"), None);
    assert_eq!(state_of(&friend.handle.cluster(), "stranger"), None);
    let strangers_view = stranger.handle.cluster();
    assert_eq!(strangers_view.members.len(), 1, "{strangers_view:?}");
}

#[tokio::test]
async fn without_seeds_or_gossip_a_node_lists_itself() {
    let alone = node("alone", &[], "herald").await;
    let view = alone.handle.cluster();
    assert!(view.gossip);
    assert_eq!(view.members.len(), 1);
    assert!(view.members[0].is_self);

    let no_gossip = EdgeNode::start(|settings| settings.node.id = Some("solo".into()))
        .await
        .expect("node");
    let body = cluster_json(&no_gossip.admin_url("/v1/cluster")).await;
    assert_eq!(body["gossip"], false);
    assert_eq!(body["members"][0]["id"], "solo");
    assert_eq!(body["members"][0]["state"], "alive");
    assert_eq!(
        body["members"][0]["http"],
        format!("http://{}", no_gossip.addr)
    );
}

/// Real processes: SIGKILL gives no chance to say goodbye, so the peers' failure
/// detectors must notice; a restarted node comes back as a new member.
#[tokio::test]
async fn a_node_killed_with_sigkill_is_suspected_by_every_peer_and_its_restart_is_a_new_member() {
    let ports: Vec<u16> = (0..3)
        .map(|_| herald_testkit::nats::free_port().expect("port"))
        .collect();
    let seed = format!("127.0.0.1:{}", ports[0]);
    let mut nodes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let id = format!("proc-{i}");
        let listen = format!("127.0.0.1:{port}");
        let process = EdgeProcess::start(
            EDGE.as_ref(),
            &[
                ("HERALD__NODE__ID", id.as_str()),
                ("HERALD__GOSSIP__LISTEN", listen.as_str()),
                ("HERALD__GOSSIP__SEEDS", seed.as_str()),
                ("HERALD__GOSSIP__INTERVAL_MS", "200"),
            ],
        )
        .await
        .expect("edge starts");
        nodes.push(process);
    }
    let urls: Vec<String> = nodes.iter().map(|n| n.admin_url("/v1/cluster")).collect();
    let states = |body: &Value| -> Vec<(String, String)> {
        body["members"]
            .as_array()
            .map(|members| {
                members
                    .iter()
                    .map(|m| {
                        (
                            m["id"].as_str().unwrap_or("").to_string(),
                            m["state"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    poll(&urls, |body| {
        states(body).iter().filter(|(_, s)| s == "alive").count() == 3
    })
    .await;
    let old_generation = generation_of(&cluster_json(&urls[0]).await, "proc-2");

    nodes[2].kill();
    poll(&urls[..2], |body| {
        states(body)
            .iter()
            .any(|(id, s)| id == "proc-2" && (s == "suspect" || s == "dead"))
    })
    .await;

    // Same id, same port: a new generation, listed once, alive.
    let listen = format!("127.0.0.1:{}", ports[2]);
    let restarted = EdgeProcess::start(
        EDGE.as_ref(),
        &[
            ("HERALD__NODE__ID", "proc-2"),
            ("HERALD__GOSSIP__LISTEN", listen.as_str()),
            ("HERALD__GOSSIP__SEEDS", seed.as_str()),
            ("HERALD__GOSSIP__INTERVAL_MS", "200"),
        ],
    )
    .await
    .expect("restart");
    poll(&urls[..2], |body| {
        let listed: Vec<_> = states(body)
            .into_iter()
            .filter(|(id, _)| id == "proc-2")
            .collect();
        listed.len() == 1
            && listed[0].1 == "alive"
            && generation_of(body, "proc-2") > old_generation
    })
    .await;
    drop(restarted);
}

fn generation_of(body: &Value, id: &str) -> u64 {
    body["members"]
        .as_array()
        .and_then(|members| members.iter().find(|m| m["id"] == id))
        .and_then(|m| m["generation"].as_u64())
        .unwrap_or(0)
}

/// Polls `/v1/cluster` of every URL until `condition` holds for each.
async fn poll(urls: &[String], condition: impl Fn(&Value) -> bool) {
    for url in urls {
        let deadline = tokio::time::Instant::now() + GOSSIP_PATIENCE;
        loop {
            let body = cluster_json(url).await;
            if condition(&body) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{url} never met the condition; last view: {body:#}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// One node's gossip is cut (UDP relays drop its datagrams) while HTTP and the
/// bus are untouched: it keeps serving and delivering, its peers suspect it,
/// and after healing everyone sees three alive members again.
#[tokio::test]
async fn a_partitioned_node_keeps_delivering_is_suspected_and_rejoins_after_healing() {
    let partition = Partition::default();
    let mut relays = Vec::new();
    let mut nodes: Vec<EdgeNode> = Vec::new();
    let mut listens = Vec::new();
    let ids = ["p-a", "p-b", "p-c"];
    for id in ids {
        // Each node gossips on its own port and advertises a relay in front.
        let port = herald_testkit::nats::free_port().expect("port");
        let listen: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let relay = UdpRelay::start(listen, partition.clone())
            .await
            .expect("relay");
        let seeds: Vec<String> = relays
            .first()
            .map(|r: &UdpRelay| vec![r.addr().to_string()])
            .unwrap_or_default();
        let advertise = relay.addr().to_string();
        let node = EdgeNode::start(|settings| {
            settings.node.id = Some(id.into());
            settings.gossip.enabled = true;
            settings.gossip.listen = listen.to_string();
            settings.gossip.advertise = Some(advertise);
            settings.gossip.seeds = seeds;
            settings.gossip.interval_ms = 200;
        })
        .await
        .expect("node");
        relays.push(relay);
        nodes.push(node);
        listens.push(listen);
    }
    for n in &nodes {
        wait_until("three alive members", GOSSIP_PATIENCE, || {
            all_alive(&n.handle.cluster(), &ids)
        })
        .await
        .expect("converged");
    }
    partition.isolate(listens[2]);
    for n in &nodes[..2] {
        wait_until("p-c is suspected", GOSSIP_PATIENCE, || {
            matches!(
                state_of(&n.handle.cluster(), "p-c"),
                Some(MemberState::Suspect | MemberState::Dead)
            )
        })
        .await
        .expect("suspected");
    }
    // The cut-off node still serves streams and delivers events.
    let mut stream = SseClient::open(&nodes[2], "pat").await.expect("stream");
    herald_testkit::publish_to_user(&nodes[2], "pat", "during the partition")
        .await
        .expect("publish");
    let event = stream.next_event(PATIENCE).await.expect("delivered");
    assert_eq!(event.data, "during the partition");

    partition.heal();
    for n in &nodes {
        wait_until("three alive members again", GOSSIP_PATIENCE, || {
            all_alive(&n.handle.cluster(), &ids)
        })
        .await
        .expect("healed");
    }
}

/// Presence is asked of every node over NATS request/reply and is complete
/// once every alive member answered.
#[tokio::test]
async fn presence_counts_a_users_streams_on_every_node() {
    let nats = herald_testkit::nats::NatsServer::start().expect("nats-server");
    let start = |id: &'static str, seeds: Vec<String>| {
        let url = nats.url();
        async move {
            EdgeNode::start(|settings| {
                settings.node.id = Some(id.into());
                settings.bus.kind = herald_config::BusKind::Nats;
                settings.nats.url = url;
                settings.gossip.enabled = true;
                settings.gossip.seeds = seeds;
                settings.gossip.interval_ms = 200;
            })
            .await
            .expect("node starts")
        }
    };
    let a = start("pres-a", Vec::new()).await;
    let seed = vec![gossip_addr(&a).to_string()];
    let b = start("pres-b", seed.clone()).await;
    let c = start("pres-c", seed).await;
    let ids = ["pres-a", "pres-b", "pres-c"];
    wait_until("a sees three alive members", GOSSIP_PATIENCE, || {
        all_alive(&a.handle.cluster(), &ids)
    })
    .await
    .expect("converged");
    let _streams = [
        SseClient::open(&b, "alice").await.expect("stream"),
        SseClient::open(&b, "alice").await.expect("stream"),
        SseClient::open(&c, "alice").await.expect("stream"),
        SseClient::open(&c, "bob.with.dots").await.expect("stream"),
    ];

    let ask = |user: &str, token: Option<String>| {
        let url = a.url(&format!("/v1/presence/{user}"));
        async move {
            let mut request = reqwest::Client::new().get(url);
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let response = request.send().await.expect("presence");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.expect("JSON"))
        }
    };
    let publisher = Some(herald_testkit::publisher_token());
    let (status, body) = ask("alice", publisher.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["online"], true);
    assert_eq!(body["connections"], 3);
    assert_eq!(
        body["nodes"],
        serde_json::json!([
            {"node": "pres-b", "connections": 2},
            {"node": "pres-c", "connections": 1}
        ])
    );
    assert_eq!(body["answered"], 3);
    assert_eq!(body["expected"], 3);
    assert_eq!(body["complete"], true);

    let (_, body) = ask("bob.with.dots", publisher.clone()).await;
    assert_eq!(body["connections"], 1, "{body}");
    let (_, body) = ask("nobody", publisher.clone()).await;
    assert_eq!(body["online"], false);
    assert_eq!(body["complete"], true);

    let (status, body) = ask("alice", None).await;
    assert_eq!(status, 401, "{body}");
    let subscriber = Some(herald_testkit::subscriber_token("alice", &[]));
    let (status, body) = ask("alice", subscriber).await;
    assert!(
        matches!(status, 401 | 403),
        "a subscriber token may not ask: {status} {body}"
    );
    let (status, body) = ask("%FF%FE", publisher).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_user");
}
