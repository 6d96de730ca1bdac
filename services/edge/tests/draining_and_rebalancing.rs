//! Moving streams between nodes without losing an event: a node drained with
//! SIGTERM hands its clients to the others, and a node added to a full cluster
//! gets its share of the long-lived streams. Clients are EventSource-like
//! (they reconnect through a round-robin balancer with `Last-Event-ID`), events
//! flow the whole time, and every client must end with every event of its
//! user exactly once, in order, having never been answered anything but 200.

use std::net::SocketAddr;
use std::time::Duration;

use herald_testkit::nats::NatsServer;
use herald_testkit::process::EdgeProcess;
use herald_testkit::proxy::TcpProxy;
use herald_testkit::resuming::ResumingClient;
use herald_testkit::{EdgeNode, publisher_token, wait_until};

const EDGE: &str = env!("CARGO_BIN_EXE_herald-edge");
const PATIENCE: Duration = Duration::from_secs(30);

/// Publishes round `round` (one event per user) through `publish_url`.
async fn publish_round(publish_url: &str, users: &[String], round: usize) {
    let client = reqwest::Client::new();
    let token = publisher_token();
    for user in users {
        let body = serde_json::json!({"user": user, "data": format!("{user}:{round}")});
        let response = client
            .post(publish_url)
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("publish");
        assert_eq!(response.status(), 200, "publish of round {round}");
    }
}

/// Every client got rounds `0..rounds` of its user exactly once, in order,
/// and was never answered with anything but 200.
async fn assert_nothing_lost(clients: &[(String, ResumingClient)], rounds: usize) {
    for (user, client) in clients {
        let expected: Vec<String> = (0..rounds).map(|r| format!("{user}:{r}")).collect();
        wait_until("every client has every event", PATIENCE, || {
            client.received() >= rounds
        })
        .await
        .unwrap_or_else(|err| panic!("{user}: {err}; got {:?}", client.data()));
        assert_eq!(
            client.data(),
            expected,
            "{user}: lost, duplicated or reordered"
        );
        let statuses = client.statuses();
        assert!(
            statuses.iter().all(|s| *s == 200),
            "{user} was answered {statuses:?}"
        );
    }
}

fn ids(n: usize, prefix: &str) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

#[tokio::test]
async fn draining_one_of_three_nodes_under_load_loses_and_duplicates_nothing() {
    let nats = NatsServer::start().expect("nats-server");
    let mut nodes = Vec::new();
    for i in 0..3 {
        let id = format!("drain-{i}");
        nodes.push(
            EdgeProcess::start(
                EDGE.as_ref(),
                &[
                    ("HERALD__NODE__ID", id.as_str()),
                    ("HERALD__BUS__KIND", "nats"),
                    ("HERALD__NATS__URL", &nats.url()),
                    ("HERALD__STREAM__DRAIN_MS", "1000"),
                    ("HERALD__REBALANCE__ENABLED", "false"),
                ],
            )
            .await
            .expect("edge starts"),
        );
    }
    let upstreams: Vec<SocketAddr> = nodes
        .iter()
        .map(|n| n.addr.parse().expect("addr"))
        .collect();
    let balancer = TcpProxy::balanced(upstreams).await.expect("balancer");
    let stream_url = format!("http://{}/v1/stream", balancer.addr());
    let users = ids(30, "drained");
    let clients: Vec<(String, ResumingClient)> = users
        .iter()
        .map(|u| (u.clone(), ResumingClient::spawn(stream_url.clone(), u)))
        .collect();
    wait_until("every client holds a stream", PATIENCE, || {
        clients.iter().all(|(_, c)| c.streams() >= 1)
    })
    .await
    .expect("connected");

    let publish_url = nodes[0].url("/v1/publish");
    let rounds = 12;
    for round in 0..rounds {
        publish_round(&publish_url, &users, round).await;
        if round == 4 {
            // Wait until round 4 is everywhere, so the drain starts with
            // streams that carry history.
            wait_until("round 4 delivered", PATIENCE, || {
                clients.iter().all(|(_, c)| c.received() >= 5)
            })
            .await
            .expect("delivered");
            let clean = nodes[2].terminate(PATIENCE).await.expect("terminates");
            assert!(clean, "a drained node exits with status 0");
        }
    }
    let victim_streams = clients.iter().filter(|(_, c)| c.streams() >= 2).count();
    assert_nothing_lost(&clients, rounds).await;
    assert!(
        victim_streams > 0,
        "the drained node's clients moved to the other nodes"
    );
}

#[tokio::test]
async fn a_node_added_to_a_full_cluster_gets_its_share_without_losing_an_event() {
    let nats = NatsServer::start().expect("nats-server");
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
                settings.gossip.state_update_ms = 200;
                settings.rebalance.interval_ms = 300;
                settings.rebalance.min_excess = 3;
                settings.rebalance.slack_percent = 10;
                settings.rebalance.max_moved_per_minute_percent = 100;
            })
            .await
            .expect("node starts")
        }
    };
    let a = start("old-a", Vec::new()).await;
    let seed = vec![a.handle.gossip_addr().expect("gossip").to_string()];
    let b = start("old-b", seed.clone()).await;
    let balancer = TcpProxy::balanced(vec![a.addr, b.addr])
        .await
        .expect("balancer");
    let stream_url = format!("http://{}/v1/stream", balancer.addr());
    let users = ids(90, "spread");
    let clients: Vec<(String, ResumingClient)> = users
        .iter()
        .map(|u| (u.clone(), ResumingClient::spawn(stream_url.clone(), u)))
        .collect();
    wait_until("90 streams on two nodes", PATIENCE, || {
        a.handle.connections() + b.handle.connections() == 90
    })
    .await
    .expect("connected");
    let publish_url = a.url("/v1/publish");
    publish_round(&publish_url, &users, 0).await;

    // Scale out: the new node joins gossip and the balancer.
    let c = start("new-c", seed).await;
    balancer.add_upstream(c.addr);
    // Mean 30, slack max(3, 10 %) = 3: the old nodes come down to 33 or less.
    let mut round = 1;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        publish_round(&publish_url, &users, round).await;
        round += 1;
        let loads = [
            a.handle.connections(),
            b.handle.connections(),
            c.handle.connections(),
        ];
        if loads.iter().sum::<usize>() == 90 && loads[0] <= 33 && loads[1] <= 33 && loads[2] >= 24 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no convergence: loads {loads:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    publish_round(&publish_url, &users, round).await;
    assert_nothing_lost(&clients, round + 1).await;
    let moved = a.handle.metrics_text();
    assert!(moved.contains("herald_streams_moved_total"), "{moved}");
}
