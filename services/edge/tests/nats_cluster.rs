//! Several edge processes and several nats-servers: a node killed with SIGKILL
//! loses nothing, and a replicated stream on a three-server JetStream cluster
//! survives the loss of its leader.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use herald_testkit::nats::{NatsCluster, NatsServer, store};
use herald_testkit::process::EdgeProcess;
use herald_testkit::{PATIENCE, SseClient, publisher_token, subscriber_token};

const EDGE: &str = env!("CARGO_BIN_EXE_herald-edge");

async fn edge(nats_url: &str, extra: &[(&str, &str)]) -> EdgeProcess {
    let mut env = vec![
        ("HERALD__BUS__KIND", "nats"),
        ("HERALD__NATS__URL", nats_url),
    ];
    env.extend_from_slice(extra);
    EdgeProcess::start(EDGE.as_ref(), &env)
        .await
        .expect("edge starts")
}

async fn open(url: &str, user: &str, last_event_id: Option<&str>) -> SseClient {
    let token = subscriber_token(user, &[]);
    let auth = format!("Bearer {token}");
    let mut headers = vec![("authorization", auth.as_str())];
    if let Some(id) = last_event_id {
        headers.push(("last-event-id", id));
    }
    let client = SseClient::connect(url, &headers).await.expect("stream");
    assert_eq!(client.status, 200);
    client
}

/// Three edge nodes on one JetStream; six users spread over them; events keep
/// flowing while one node is killed with SIGKILL. Its clients reconnect to
/// another node with their last id, and across the whole run every client
/// receives every one of its user's events exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_node_mid_stream_loses_and_duplicates_nothing() {
    let nats = NatsServer::start().expect("nats-server");
    let mut nodes = Vec::new();
    for _ in 0..3 {
        nodes.push(edge(&nats.url(), &[]).await);
    }
    let users: Vec<String> = (0..6).map(|i| format!("user-{i}")).collect();
    let mut clients = Vec::new();
    for (i, user) in users.iter().enumerate() {
        clients.push((
            i % 3,
            open(&nodes[i % 3].url("/v1/stream"), user, None).await,
        ));
    }

    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let mut published: HashMap<String, Vec<u64>> = HashMap::new();
    let total = 60;
    let mut received: Vec<Vec<String>> = vec![Vec::new(); users.len()];
    for n in 0..total {
        let user = &users[n % users.len()];
        let ack = js
            .publish(format!("herald.user.{user}"), format!("{n}").into())
            .await
            .expect("sent")
            .await
            .expect("stored");
        published
            .entry(user.clone())
            .or_default()
            .push(ack.sequence);
        if n == total / 3 {
            nodes[0].kill();
        }
    }

    // Each client reads until it has all its user's events, reconnecting to
    // the next node (with its last id) whenever its stream ends.
    for (index, (node, client)) in clients.iter_mut().enumerate() {
        let wanted = published[&users[index]].len();
        while received[index].len() < wanted {
            match client.next_event(PATIENCE).await {
                Ok(event) => received[index].push(event.id),
                Err(_) => {
                    *node = (*node + 1) % 3;
                    if *node == 0 {
                        *node = 1;
                    }
                    let last = client.last_event_id().to_owned();
                    *client =
                        open(&nodes[*node].url("/v1/stream"), &users[index], Some(&last)).await;
                }
            }
        }
    }
    for (index, user) in users.iter().enumerate() {
        let seqs: Vec<u64> = received[index]
            .iter()
            .map(|id| {
                id.rsplit('-')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("id")
            })
            .collect();
        assert_eq!(seqs, published[user], "{user}: every event once, in order");
    }
}

/// An edge on `cluster` with an R3 stream. The cluster elects its JetStream
/// leader shortly after start; the node waits for it (and retries), so a few
/// attempts are plenty.
async fn edge_on_r3(cluster: &NatsCluster) -> EdgeProcess {
    let url = cluster.url();
    let env = [
        ("HERALD__BUS__KIND", "nats"),
        ("HERALD__NATS__URL", url.as_str()),
        ("HERALD__NATS__REPLICAS", "3"),
    ];
    for _ in 0..6 {
        let start = EdgeProcess::start(EDGE.as_ref(), &env);
        match tokio::time::timeout(Duration::from_secs(20), start).await {
            Ok(Ok(started)) => return started,
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
    panic!(
        "an edge node starts once the JetStream cluster is up; the servers' logs:\n{}",
        cluster.log_tails(30)
    )
}

/// A JetStream client connected to every server of `cluster`.
async fn jetstream_on(cluster: &NatsCluster) -> jetstream::Context {
    let servers: Vec<async_nats::ServerAddr> = cluster
        .servers
        .iter()
        .map(|server| server.url().parse().expect("server address"))
        .collect();
    jetstream::new(async_nats::connect(servers).await.expect("client"))
}

/// The name of the HERALD stream's current leader.
async fn stream_leader(js: &jetstream::Context) -> Option<String> {
    let mut stream = js.get_stream("HERALD").await.ok()?;
    stream.info().await.ok()?.cluster.clone()?.leader
}

/// The newest stream sequence an SSE id carries (after its `-`, before any
/// per-target positions).
fn sequence(id: &str) -> u64 {
    id.split('.')
        .next()
        .and_then(|head| head.rsplit('-').next())
        .and_then(|s| s.parse().ok())
        .expect("an id ending in the stream sequence")
}

/// On a three-server JetStream cluster with an R3 stream, events flow; when the
/// stream's leader is killed, a publisher retrying with the same `msg_id` gets
/// its event stored once, and the client receives it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_r3_stream_survives_the_loss_of_its_leader() {
    let mut cluster = NatsCluster::start(3).expect("cluster");
    let node = edge_on_r3(&cluster).await;
    let mut stream = open(&node.url("/v1/stream"), "alice", None).await;
    let http = reqwest::Client::new();
    let before: serde_json::Value = http
        .post(node.url("/v1/publish"))
        .bearer_auth(publisher_token())
        .body(r#"{"user":"alice","data":"before failover"}"#)
        .send()
        .await
        .expect("published")
        .json()
        .await
        .expect("json");
    // The stream is live (its start-up replay is done) before the leader dies.
    assert_eq!(
        stream.next_event(PATIENCE).await.expect("before").id,
        before["id"].as_str().expect("id")
    );

    let js = jetstream_on(&cluster).await;
    let info = js
        .get_stream("HERALD")
        .await
        .expect("stream")
        .cached_info()
        .clone();
    assert_eq!(info.config.num_replicas, 3);
    let leader = info.cluster.and_then(|c| c.leader).expect("a leader");
    let index: usize = leader
        .trim_start_matches('n')
        .parse()
        .expect("server name n<i>");
    cluster.servers[index].kill();

    let mut answer = None;
    for _ in 0..100 {
        let response = http
            .post(node.url("/v1/publish"))
            .bearer_auth(publisher_token())
            .body(r#"{"user":"alice","data":"after failover","msg_id":"failover-1"}"#)
            .send()
            .await;
        if let Ok(response) = response {
            if response.status() == 200 {
                answer = Some(response.json::<serde_json::Value>().await.expect("json"));
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answer = answer.expect("publishing works again after the election");
    let retry: serde_json::Value = http
        .post(node.url("/v1/publish"))
        .bearer_auth(publisher_token())
        .body(r#"{"user":"alice","data":"after failover","msg_id":"failover-1"}"#)
        .send()
        .await
        .expect("answered")
        .json()
        .await
        .expect("json");
    assert_eq!(retry["id"], answer["id"]);
    assert_eq!(retry["duplicate"], true);
    let event = stream.next_event(PATIENCE).await.expect("delivered");
    assert_eq!(event.id, answer["id"].as_str().expect("id"));
    assert_eq!(event.data, "after failover");
}

/// A stream leader that steps down may not have sent the live copies of what
/// it stored last, and its successor never sends them; a node whose own
/// connection stayed up sees no reconnect. The user's lost event still
/// reaches a client following its user and a topic, though the user receives
/// nothing more (the periodic check finds it), and whichever order the two
/// targets' events were written in, resuming from the first one's id gets
/// exactly the second. (Found by the chaos scenario `mixed-targets`: the
/// topic's events went first, and a client that resumed from one of their
/// ids never got the user's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_leader_change_a_lost_copy_arrives_and_every_id_resumes_exactly() {
    let cluster = NatsCluster::start(3).expect("cluster");
    let node = edge_on_r3(&cluster).await;
    let token = subscriber_token("alice", &["news"]);
    let auth = format!("Bearer {token}");
    let mut stream = SseClient::connect(
        &node.url("/v1/stream?topic=news"),
        &[("authorization", auth.as_str())],
    )
    .await
    .expect("stream");
    assert_eq!(stream.status, 200);
    let js = jetstream_on(&cluster).await;
    let first = store(&js, "herald.user.alice", "live").await;
    assert_eq!(
        sequence(&stream.next_event(PATIENCE).await.expect("live").id),
        first
    );

    // alice's next event is stored, but its live copy goes nowhere.
    let mut herald = js.get_stream("HERALD").await.expect("stream");
    let original = herald.info().await.expect("info").config.clone();
    let mut detour = original.clone();
    detour.republish.as_mut().expect("republish").destination = "nowhere.>".into();
    js.update_stream(detour).await.expect("detour");
    let lost = store(&js, "herald.user.alice", "copy lost").await;
    js.update_stream(original).await.expect("restored");

    // The leader steps down; the topic's event is stored by its successor.
    let old_leader = stream_leader(&js).await.expect("a leader");
    let answer: serde_json::Value = serde_json::from_slice(
        &js.client()
            .request("$JS.API.STREAM.LEADER.STEPDOWN.HERALD", "".into())
            .await
            .expect("step down answered")
            .payload,
    )
    .expect("json");
    assert_eq!(answer["success"], true, "step down: {answer}");
    let mut new_leader = None;
    for _ in 0..200 {
        new_leader = stream_leader(&js)
            .await
            .filter(|leader| *leader != old_leader);
        if new_leader.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        new_leader.is_some(),
        "a new leader after {old_leader} stepped down"
    );
    let later = store(&js, "herald.topic.news", "after the election").await;

    let events = stream.events(2).await.expect("both events");
    let mut data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
    data.sort_unstable();
    assert_eq!(data, ["after the election", "copy lost"]);
    assert!(sequence(&events[1].id) >= lost.max(later));

    let mut resumed = SseClient::connect(
        &node.url("/v1/stream?topic=news"),
        &[
            ("authorization", auth.as_str()),
            ("last-event-id", events[0].id.as_str()),
        ],
    )
    .await
    .expect("resumed");
    assert_eq!(
        resumed
            .next_event(PATIENCE)
            .await
            .expect("the second again")
            .data,
        events[1].data,
        "resumed from {}",
        events[0].id
    );
}
