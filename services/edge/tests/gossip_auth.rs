//! Gossip under attack: with a cluster key every datagram is sealed, so a
//! forged or replayed one changes nobody's view of the cluster, and each is
//! counted in `herald_gossip_rejected_total`; a node gossiping beyond loopback
//! without a key refuses to start.
//!
//! The forgeries are made the way issue 18's attacker could: real chitchat
//! nodes (the crate Herald gossips with, through its public API only) speaking
//! plain UDP, one claiming to be a new member `rogue-2` with an HTTP address
//! outside the cluster, one claiming to be the real `node-b` with its state a
//! hundred thousand versions ahead (draining, not ready, 123,456,789
//! streams). A raw UDP socket between them collects their Syn, SynAck and Ack
//! datagrams. A keyless node proves the forgeries work when gossip is plain;
//! the sealed cluster then receives them.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use chitchat::transport::UdpTransport;
use chitchat::{
    ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig, ProtocolVersion,
    spawn_chitchat,
};
use herald_config::Secret;
use herald_edge::{MemberState, NodeInfo};
use herald_testkit::udp_relay::{Partition, UdpRelay};
use herald_testkit::{EdgeNode, wait_until};
use tokio::net::UdpSocket;

/// The cluster key of these tests (`openssl rand -base64 32`).
const KEY: &str = "5XBO3517hOcdqRJopKI2qOVXHPUTX7f4vFc8A+YKe9g=";
/// A second key, for rotation.
const NEW_KEY: &str = "j60v6Wy7zFwTRQ+2SvIVWQMqoQtOTSY2Q+3C9/qw/6E=";

/// A short replay window, so the replay-after-the-window attack waits 1.5 s.
const WINDOW_MS: u64 = 1_500;

const GOSSIP_PATIENCE: Duration = Duration::from_secs(30);

/// chitchat's message type, the fourth byte of a plain datagram.
const SYN: u8 = 0;
const SYN_ACK: u8 = 1;
const ACK: u8 = 2;

/// A node gossiping on `listen` (a free loopback port when `None`) with
/// `secret`, joining through `seeds`.
async fn node(
    id: &str,
    secret: Option<&str>,
    seeds: Vec<String>,
    listen: Option<SocketAddr>,
    advertise: Option<SocketAddr>,
) -> EdgeNode {
    EdgeNode::start(|settings| {
        settings.node.id = Some(id.into());
        settings.gossip.enabled = true;
        settings.gossip.seeds = seeds;
        settings.gossip.interval_ms = 200;
        settings.gossip.replay_window_ms = WINDOW_MS;
        settings.gossip.secret = secret.map(Secret::new);
        if let Some(listen) = listen {
            settings.gossip.listen = listen.to_string();
        }
        settings.gossip.advertise = advertise.map(|a| a.to_string());
    })
    .await
    .expect("node starts")
}

fn gossip_addr(node: &EdgeNode) -> SocketAddr {
    node.handle.gossip_addr().expect("gossip enabled")
}

fn ids(node: &EdgeNode) -> BTreeSet<String> {
    node.handle
        .cluster()
        .members
        .iter()
        .map(|m| m.id.clone())
        .collect()
}

fn all_alive(node: &EdgeNode, expected: &[&str]) -> bool {
    let view = node.handle.cluster();
    view.members.len() == expected.len()
        && view
            .members
            .iter()
            .all(|m| m.state == MemberState::Alive && expected.contains(&m.id.as_str()))
}

/// What an attack could change in a node's `/v1/cluster`: every member's id,
/// state, HTTP address, generation and gossiped load.
async fn view_of(node: &EdgeNode) -> BTreeSet<String> {
    let body: serde_json::Value = reqwest::get(node.admin_url("/v1/cluster"))
        .await
        .expect("GET /v1/cluster")
        .json()
        .await
        .expect("JSON");
    body["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            format!(
                "{} {} {} gen={} conns={} users={} draining={} ready={}",
                m["id"],
                m["state"],
                m["http"],
                m["generation"],
                m["connections"],
                m["users"],
                m["draining"],
                m["ready"]
            )
        })
        .collect()
}

/// `herald_gossip_rejected_total{reason}` of `node`.
fn rejected(node: &EdgeNode, reason: &str) -> u64 {
    let prefix = format!("herald_gossip_rejected_total{{reason=\"{reason}\"}} ");
    node.handle
        .metrics_text()
        .lines()
        .find_map(|line| line.strip_prefix(prefix.as_str()))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

/// A plain chitchat node (no Herald, no key) with identity `id`, listening on
/// a free loopback port, gossiping `info`.
async fn rogue(
    id: ChitchatId,
    seeds: Vec<String>,
    info: &NodeInfo,
) -> (ChitchatHandle, SocketAddr) {
    let listen = UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("probe")
        .local_addr()
        .expect("addr");
    let config = ChitchatConfig {
        chitchat_id: id,
        cluster_id: "herald".into(),
        gossip_interval: Duration::from_millis(100),
        listen_addr: listen,
        seed_nodes: seeds,
        failure_detector_config: FailureDetectorConfig::default(),
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V0,
    };
    let handle = spawn_chitchat(config, info.to_key_values(), &UdpTransport)
        .await
        .expect("rogue chitchat starts");
    (handle, listen)
}

/// Waits on `socket` for a chitchat datagram of `kind` from `from`.
async fn datagram_from(socket: &UdpSocket, from: SocketAddr, kind: u8) -> Vec<u8> {
    let mut buf = vec![0u8; 65_536];
    tokio::time::timeout(GOSSIP_PATIENCE, async {
        loop {
            let (len, sender) = socket.recv_from(&mut buf).await.expect("recv");
            if sender == from && len > 3 && buf[3] == kind {
                return buf[..len].to_vec();
            }
        }
    })
    .await
    .expect("the rogue answered")
}

/// Forged Syn, SynAck and Ack (a new member; a real member's state a hundred
/// thousand versions ahead), a datagram in the sealed format under a guessed
/// key, and a captured genuine datagram replayed at once and after the replay
/// window: `/v1/cluster` is unchanged on every node and every datagram is
/// counted by reason. The same forgeries, sent to a node without a key, do
/// add `rogue-2` and rewrite `node-b`, so they are real attacks.
#[tokio::test]
async fn forged_and_replayed_gossip_changes_no_view_and_every_datagram_is_counted() {
    // A sealed three-node cluster; node-a advertises a relay in front of its
    // port, so genuine datagrams to it can be captured.
    let a_listen: SocketAddr = format!(
        "127.0.0.1:{}",
        herald_testkit::nats::free_port().expect("port")
    )
    .parse()
    .expect("addr");
    let relay = UdpRelay::start(a_listen, Partition::default())
        .await
        .expect("relay");
    let a = node(
        "node-a",
        Some(KEY),
        Vec::new(),
        Some(a_listen),
        Some(relay.addr()),
    )
    .await;
    let b = node(
        "node-b",
        Some(KEY),
        vec![relay.addr().to_string()],
        None,
        None,
    )
    .await;
    let c = node(
        "node-c",
        Some(KEY),
        vec![relay.addr().to_string()],
        None,
        None,
    )
    .await;
    let nodes = [&a, &b, &c];
    for n in nodes {
        wait_until(
            "three alive members with sealed gossip",
            GOSSIP_PATIENCE,
            || all_alive(n, &["node-a", "node-b", "node-c"]),
        )
        .await
        .expect("a sealed cluster converges");
    }

    // The attacker's material.
    let b_generation = b
        .handle
        .cluster()
        .members
        .iter()
        .find(|m| m.is_self)
        .expect("self listed")
        .generation;
    let attacker = UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("attacker socket");
    let attacker_addr = attacker.local_addr().expect("addr");
    let (new_member, new_member_addr) = rogue(
        ChitchatId::new("rogue-2", 1, "127.0.0.1:9".parse().expect("addr")),
        Vec::new(),
        &NodeInfo {
            http: "http://203.0.113.66:8080".into(),
            ready: true,
            ..NodeInfo::default()
        },
    )
    .await;
    let (impostor, impostor_addr) = rogue(
        ChitchatId::new("node-b", b_generation, gossip_addr(&b)),
        vec![attacker_addr.to_string()],
        &NodeInfo::default(),
    )
    .await;
    {
        // node-b's state, far ahead of anything the real node-b has sent.
        let chitchat = impostor.chitchat();
        let mut chitchat = chitchat.lock().await;
        let state = chitchat.self_node_state();
        for version in 0..100_000u64 {
            state.set("conns", version.to_string());
        }
        let fake = NodeInfo {
            http: format!("http://{}", b.addr),
            connections: 123_456_789,
            draining: true,
            ready: false,
            ..NodeInfo::default()
        };
        for (key, value) in fake.to_key_values() {
            state.set(key, value);
        }
    }
    // The impostor's Syn, the new member's SynAck to it (carrying rogue-2),
    // the impostor's Ack to that (carrying the fake node-b).
    let syn = datagram_from(&attacker, impostor_addr, SYN).await;
    attacker.send_to(&syn, new_member_addr).await.expect("send");
    let syn_ack = datagram_from(&attacker, new_member_addr, SYN_ACK).await;
    attacker
        .send_to(&syn_ack, impostor_addr)
        .await
        .expect("send");
    let ack = datagram_from(&attacker, impostor_addr, ACK).await;

    // Control: a node without a key takes them in.
    let plain = node("plain", None, Vec::new(), None, None).await;
    for datagram in [&syn_ack, &ack] {
        attacker
            .send_to(datagram, gossip_addr(&plain))
            .await
            .expect("send");
    }
    wait_until("the keyless node is fooled", GOSSIP_PATIENCE, || {
        let view = plain.handle.cluster();
        let rogue_listed = view.members.iter().any(|m| m.id == "rogue-2");
        let b_rewritten = view
            .members
            .iter()
            .any(|m| m.id == "node-b" && m.draining && m.connections == 123_456_789);
        rogue_listed && b_rewritten
    })
    .await
    .expect("the forgeries work against plain gossip");
    // Stopped, or it would gossip its fake view to the real node-b.
    plain.stop().await.expect("the keyless node stops");

    // The attack on the sealed cluster. First keep a genuine datagram to
    // node-a (from node-b or node-c, through the relay).
    let genuine = relay
        .captured()
        .pop()
        .expect("the relay forwarded datagrams");
    let before = [view_of(&a).await, view_of(&b).await, view_of(&c).await];
    let targets = [a_listen, relay.addr(), gossip_addr(&b), gossip_addr(&c)];
    // The sealed format under a guessed key: a format byte, a made-up header,
    // the forged SynAck and a made-up tag.
    let mut guessed = vec![0x01];
    guessed.extend_from_slice(&[0x42; 24]);
    guessed.extend_from_slice(&syn_ack);
    guessed.extend_from_slice(&[0x17; 16]);
    for target in targets {
        for datagram in [&syn, &syn_ack, &ack, &guessed] {
            attacker.send_to(datagram, target).await.expect("send");
        }
    }
    // A genuine datagram to node-a, replayed straight to its port at once
    // (already received through the relay: `replayed`, or `stale` on a slow
    // machine) and again after the window (`stale`).
    attacker.send_to(&genuine, a_listen).await.expect("send");
    tokio::time::sleep(Duration::from_millis(WINDOW_MS + 500)).await;
    attacker.send_to(&genuine, a_listen).await.expect("send");

    // Every datagram is dropped before chitchat sees it and counted.
    wait_until("node-a counted every datagram", GOSSIP_PATIENCE, || {
        rejected(&a, "malformed") >= 6
            && rejected(&a, "bad_tag") >= 2
            && rejected(&a, "stale") >= 1
            && rejected(&a, "replayed") + rejected(&a, "stale") >= 2
    })
    .await
    .expect("node-a counts");
    for n in [&b, &c] {
        wait_until("the others counted theirs", GOSSIP_PATIENCE, || {
            rejected(n, "malformed") >= 3 && rejected(n, "bad_tag") >= 1
        })
        .await
        .expect("counted");
    }
    let after = [view_of(&a).await, view_of(&b).await, view_of(&c).await];
    assert_eq!(before, after, "an attack changed a node's view");
    for n in nodes {
        assert_eq!(
            ids(n),
            BTreeSet::from(["node-a".into(), "node-b".into(), "node-c".into()])
        );
        let view = n.handle.cluster();
        let node_b = view
            .members
            .iter()
            .find(|m| m.id == "node-b")
            .expect("node-b listed");
        assert!(
            !node_b.draining && node_b.ready && node_b.connections == 0,
            "{node_b:?}"
        );
    }
    let metrics = a.handle.metrics_text();
    assert!(
        metrics.contains("herald_gossip_rejected_total{reason=\"too_many_senders\"} 0"),
        "every reason is exported from the start:\n{metrics}"
    );

    for rogue in [new_member, impostor] {
        let _ = rogue.shutdown().await;
    }
}

/// Rotation: a node sealing with the old key and accepting the new one
/// (`gossip.secret = "OLD,NEW"`) and a node with only the old key form a
/// cluster; a node with only the new key is refused by the old-key node
/// (`bad_tag`) and never appears in its view.
#[tokio::test]
async fn during_a_key_rotation_nodes_sharing_a_key_converge_and_others_are_refused() {
    let old = node("old", Some(KEY), Vec::new(), None, None).await;
    let rotating = node(
        "rotating",
        Some(&format!("{KEY},{NEW_KEY}")),
        vec![gossip_addr(&old).to_string()],
        None,
        None,
    )
    .await;
    for n in [&old, &rotating] {
        wait_until("old and rotating converge", GOSSIP_PATIENCE, || {
            all_alive(n, &["old", "rotating"])
        })
        .await
        .expect("converged");
    }
    let new = node(
        "new",
        Some(NEW_KEY),
        vec![gossip_addr(&old).to_string()],
        None,
        None,
    )
    .await;
    wait_until(
        "the old-key node refuses the new-key node",
        GOSSIP_PATIENCE,
        || rejected(&old, "bad_tag") >= 3,
    )
    .await
    .expect("refused");
    assert_eq!(ids(&old), BTreeSet::from(["old".into(), "rotating".into()]));
    assert_eq!(ids(&new), BTreeSet::from(["new".into()]));
}

/// `gossip.listen` on a wildcard address without a key: the real binary exits
/// with status 64 before binding anything, naming the key and saying how to
/// generate one.
#[tokio::test]
async fn a_node_gossiping_beyond_loopback_without_a_key_refuses_to_start_and_says_how_to_make_one()
{
    let binary = std::path::Path::new(env!("CARGO_BIN_EXE_herald-edge"));
    let (mut command, _) =
        herald_testkit::process::command(binary, &[("HERALD__GOSSIP__LISTEN", "0.0.0.0:0")])
            .expect("command");
    command
        .env_remove("HERALD__GOSSIP__SECRET")
        .stderr(Stdio::piped());
    let output = tokio::process::Command::from(command)
        .output()
        .await
        .expect("herald-edge runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("gossip.secret"), "{stderr}");
    assert!(stderr.contains("openssl rand -base64 32"), "{stderr}");

    // The same node with a key starts: it answers /readyz (and is killed on drop).
    herald_testkit::process::EdgeProcess::start(
        binary,
        &[
            ("HERALD__GOSSIP__LISTEN", "0.0.0.0:0"),
            ("HERALD__GOSSIP__SECRET", KEY),
        ],
    )
    .await
    .expect("with a key the node starts");
}
