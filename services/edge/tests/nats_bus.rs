//! The NATS JetStream bus against real nats-server processes: publishing from
//! any client, interest-based fan-out across nodes, resume on another node,
//! deduplication, gap repair, outages, recreated streams and isolation.

use std::time::Duration;

use async_nats::jetstream;
use futures_util::{FutureExt, StreamExt};
use herald_config::{BusKind, NatsSettings};
use herald_protocol::sse::Item;
use herald_testkit::nats::{NatsServer, store};
use herald_testkit::proxy::TcpProxy;
use herald_testkit::{EdgeNode, PATIENCE, SseClient, publish, subscriber_token, wait_until};
use serde_json::json;

/// The `<epoch>-<newest>` part of a stream id: the event's own id when the
/// event is its stream's newest (one target, or events in stream order).
fn own_id(id: &str) -> String {
    id.split('.').next().unwrap_or(id).to_owned()
}

/// Starts a node on the NATS bus at `url`, with `configure` applied to its
/// NATS settings. Nothing lingers (`linger_secs = 0`) unless `configure`
/// says so: these tests resume from the stream itself, and a released
/// follow stops receiving at once.
async fn start_on_nats(
    url: String,
    configure: impl FnOnce(&mut NatsSettings),
) -> anyhow::Result<EdgeNode> {
    EdgeNode::start(move |s| {
        s.bus.kind = BusKind::Nats;
        s.nats.url = url;
        s.nats.linger_secs = 0;
        configure(&mut s.nats);
    })
    .await
}

/// A node on `nats` with `configure` applied to its NATS settings.
async fn nats_node_with(nats: &NatsServer, configure: impl FnOnce(&mut NatsSettings)) -> EdgeNode {
    start_on_nats(nats.url(), configure)
        .await
        .expect("node starts on NATS")
}

/// A node on `nats` with the default NATS settings.
async fn nats_node(nats: &NatsServer) -> EdgeNode {
    nats_node_with(nats, |_| {}).await
}

fn metric(node: &EdgeNode, name: &str) -> u64 {
    node.handle
        .metrics_text()
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

async fn publish_to(node: &EdgeNode, body: serde_json::Value) -> String {
    let (status, answer) = publish(node, body).await.expect("publish");
    assert_eq!(status, 200, "{answer}");
    answer["id"].as_str().expect("id").to_owned()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Publishes `body` while the stream republishes somewhere no node listens:
/// the event is stored, but its live copy is lost (the fault behind a gap fill).
async fn publish_losing_the_live_copy(
    js: &jetstream::Context,
    node: &EdgeNode,
    body: serde_json::Value,
) -> String {
    let mut herald = js.get_stream("HERALD").await.expect("stream");
    let original = herald.info().await.expect("info").config.clone();
    let mut detour = original.clone();
    if let Some(republish) = detour.republish.as_mut() {
        republish.destination = "nowhere.>".into();
    }
    js.update_stream(detour).await.expect("detour");
    let id = publish_to(node, body).await;
    js.update_stream(original).await.expect("restored");
    id
}

/// Opens `user`'s stream on `node`, resuming after `last_event_id`.
async fn resume(node: &EdgeNode, user: &str, last_event_id: &str) -> SseClient {
    resume_at(
        node,
        "/v1/stream",
        &subscriber_token(user, &[]),
        last_event_id,
    )
    .await
}

/// Opens `path` on `node` with `token`, resuming after `last_event_id`.
async fn resume_at(node: &EdgeNode, path: &str, token: &str, last_event_id: &str) -> SseClient {
    let stream = SseClient::connect(
        &node.url(path),
        &[
            ("authorization", &bearer(token)),
            ("last-event-id", last_event_id),
        ],
    )
    .await
    .expect("resume");
    assert_eq!(stream.status, 200);
    stream
}

/// An event published over HTTP on one node reaches a stream held by another.
#[tokio::test]
async fn an_event_published_on_one_node_is_delivered_by_another() {
    let nats = NatsServer::start().expect("nats-server");
    let (a, b) = (nats_node(&nats).await, nats_node(&nats).await);
    let mut alice = SseClient::open(&b, "alice").await.expect("stream on b");
    let id = publish_to(
        &a,
        json!({"user": "alice", "event": "greeting", "data": "hi"}),
    )
    .await;
    let event = alice.next_event(PATIENCE).await.expect("event");
    assert_eq!(
        (event.id, event.event_type, event.data),
        (id, "greeting".into(), "hi".into())
    );
}

/// The duplicate window bounds deduplication: a retry with the same `msg_id`
/// inside it is the first event (`duplicate: true`, nothing stored); the same
/// `msg_id` once the window has passed is a new event, delivered again. This
/// is the documented contract, not a defect: retries belong inside the window.
#[tokio::test]
async fn a_msg_id_repeated_after_the_duplicate_window_is_a_second_event() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node_with(&nats, |n| n.duplicate_window_secs = 1).await;
    let mut stream = SseClient::open(&node, "alice").await.expect("stream");
    let body = json!({"user": "alice", "data": "once", "msg_id": "order-7"});
    let (_, first) = publish(&node, body.clone()).await.expect("first");
    let (_, retry) = publish(&node, body.clone()).await.expect("retry");
    assert_eq!(
        (retry["duplicate"].as_bool(), &retry["id"]),
        (Some(true), &first["id"])
    );
    // Wait out the window (a fixed span of time, not a race).
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (_, late) = publish(&node, body).await.expect("late");
    assert_eq!(late["duplicate"].as_bool(), Some(false), "{late}");
    assert_ne!(late["id"], first["id"]);
    let events = stream.events(2).await.expect("two deliveries");
    assert_eq!(
        events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        [
            first["id"].as_str().expect("id"),
            late["id"].as_str().expect("id")
        ]
    );
}

/// Any NATS client can publish: the subject rule, the `Herald-Event` header and
/// `Nats-Msg-Id` are all a publisher needs.
#[tokio::test]
async fn a_plain_nats_client_publishes_typed_deduplicated_events() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node(&nats).await;
    let mut stream = SseClient::open(&node, "alice").await.expect("stream");
    let client = async_nats::connect(nats.url()).await.expect("client");
    let js = jetstream::new(client);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Herald-Event", "order.shipped");
    headers.insert("Nats-Msg-Id", "order-42");
    let first = js
        .publish_with_headers(
            "herald.user.alice",
            headers.clone(),
            "line 1\nline 2".into(),
        )
        .await
        .expect("sent")
        .await
        .expect("stored");
    let retry = js
        .publish_with_headers("herald.user.alice", headers, "line 1\nline 2".into())
        .await
        .expect("sent")
        .await
        .expect("answered");
    assert!(retry.duplicate);
    assert_eq!(retry.sequence, first.sequence);
    js.publish("herald.user.alice", "after".into())
        .await
        .expect("sent")
        .await
        .expect("stored");

    let events = stream.events(2).await.expect("events");
    assert_eq!(events[0].event_type, "order.shipped");
    assert_eq!(events[0].data, "line 1\nline 2");
    assert!(events[0].id.ends_with(&format!("-{}", first.sequence)));
    assert_eq!(
        events[1].data, "after",
        "the retry was not delivered a second time"
    );
}

/// A node receives only the events of users it holds streams for: node B,
/// holding bob, never receives alice's events from NATS.
#[tokio::test]
async fn a_node_receives_only_the_events_of_the_users_it_holds() {
    let nats = NatsServer::start().expect("nats-server");
    let (a, b) = (nats_node(&nats).await, nats_node(&nats).await);
    let mut alice = SseClient::open(&a, "alice").await.expect("stream");
    let mut bob = SseClient::open(&b, "bob").await.expect("stream");
    for i in 0..5 {
        publish_to(&a, json!({"user": "alice", "data": format!("a{i}")})).await;
        publish_to(&a, json!({"user": "bob", "data": format!("b{i}")})).await;
    }
    alice.events(5).await.expect("alice's events");
    bob.events(5).await.expect("bob's events");
    assert_eq!(metric(&a, "herald_bus_messages_received_total"), 5);
    assert_eq!(metric(&b, "herald_bus_messages_received_total"), 5);

    // Two streams of one user on a node share one subscription.
    let mut alice_again = SseClient::open(&a, "alice").await.expect("stream");
    publish_to(&b, json!({"user": "alice", "data": "both"})).await;
    assert_eq!(
        alice.next_event(PATIENCE).await.expect("event").data,
        "both"
    );
    assert_eq!(
        alice_again.next_event(PATIENCE).await.expect("event").data,
        "both"
    );
    assert_eq!(metric(&a, "herald_bus_messages_received_total"), 6);
}

/// A client that leaves one node and comes back on another with its
/// `Last-Event-ID` receives exactly what it missed, in order, then live events.
#[tokio::test]
async fn resuming_on_another_node_delivers_exactly_the_missed_events() {
    let nats = NatsServer::start().expect("nats-server");
    let (a, b) = (nats_node(&nats).await, nats_node(&nats).await);
    let token = subscriber_token("alice", &["news"]);
    let mut first = SseClient::connect(
        &a.url("/v1/stream?topic=news"),
        &[("authorization", &bearer(&token))],
    )
    .await
    .expect("stream");
    let mut published = Vec::new();
    for i in 0..3 {
        published.push(publish_to(&a, json!({"user": "alice", "data": format!("u{i}")})).await);
    }
    let seen = first.events(3).await.expect("events");
    let last = seen[2].id.clone();
    drop(first);
    for i in 0..3 {
        published.push(publish_to(&b, json!({"user": "alice", "data": format!("m{i}")})).await);
        published.push(publish_to(&b, json!({"topic": "news", "data": format!("n{i}")})).await);
        publish_to(&b, json!({"user": "bob", "data": "not for alice"})).await;
    }
    let mut resumed = SseClient::connect(
        &b.url("/v1/stream?topic=news"),
        &[("authorization", &bearer(&token)), ("last-event-id", &last)],
    )
    .await
    .expect("stream");
    published.push(publish_to(&a, json!({"user": "alice", "data": "live"})).await);
    // Published one after another and delivered in that order, each event's
    // id leads with its own sequence (the id's newest position).
    let ids: Vec<String> = resumed
        .events(7)
        .await
        .expect("events")
        .into_iter()
        .map(|e| own_id(&e.id))
        .collect();
    assert_eq!(ids, published[3..]);
}

/// A user following three topics while events for all four targets (and for
/// someone else) are published as fast as JetStream takes them, reading a
/// few events at a time and reconnecting with `Last-Event-ID` to either of two
/// nodes after each: every event once, each target's events in their order,
/// across all the connections (reliability matrix row 13: the id carries
/// every target's position, so a resume never skips a target that lagged
/// behind another, whatever order two targets' events arrived in).
#[tokio::test]
async fn a_user_following_three_topics_through_random_reconnects_gets_each_event_once_in_order() {
    const EVENTS: usize = 300;
    let nats = NatsServer::start().expect("nats-server");
    let nodes = [nats_node(&nats).await, nats_node(&nats).await];
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let subjects = [
        "herald.user.alice",
        "herald.topic.t1",
        "herald.topic.t2",
        "herald.topic.t3",
    ];
    // A small deterministic generator: the same interleaving on every run.
    let mut state = 0x2545_f491_u64;
    let mut next = move |bound: usize| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        (state >> 33) as usize % bound
    };
    let plan: Vec<&str> = (0..EVENTS)
        .map(|_| subjects[next(subjects.len())])
        .collect();
    let target_of: Vec<&str> = plan.clone();

    // The first stream is open, and knows where it starts, before anything
    // is published: a fresh stream starts at the head.
    let token = subscriber_token("alice", &["t1", "t2", "t3"]);
    let path = "/v1/stream?topic=t1&topic=t2&topic=t3";
    let mut first = SseClient::connect(&nodes[0].url(path), &[("authorization", &bearer(&token))])
        .await
        .expect("stream");
    while first.last_event_id().is_empty() {
        first.next_item(PATIENCE).await.expect("opening frames");
    }

    let publisher = tokio::spawn(async move {
        let mut acks = Vec::new();
        for (i, subject) in plan.into_iter().enumerate() {
            acks.push(
                js.publish(subject, format!("e{i}").into())
                    .await
                    .expect("sent"),
            );
            if i % 3 == 0 {
                js.publish("herald.user.bob", "not for alice".into())
                    .await
                    .expect("sent");
            }
        }
        let mut sequences = Vec::new();
        for ack in acks {
            sequences.push(ack.await.expect("stored").sequence);
        }
        sequences
    });

    let mut received: Vec<(usize, String)> = Vec::new();
    let mut last = first.last_event_id().to_owned();
    let mut opened = Some(first);
    let mut connections = 0;
    while received.len() < EVENTS {
        connections += 1;
        assert!(
            connections < 500,
            "no progress after {connections} connections"
        );
        let mut stream = match opened.take() {
            Some(stream) => stream,
            None => resume_at(&nodes[next(nodes.len())], path, &token, &last).await,
        };
        // Read a few events, then drop the connection right after the last
        // one read: the client resumes from its id (frames already buffered
        // behind it are lost, as with a cut connection). A stream the node
        // ends (a client too slow for the burst) resumes from the last id the
        // client parsed, as a browser does.
        let want = (1 + next(40)).min(EVENTS - received.len());
        let mut read = 0;
        while read < want {
            let item = stream.next_item(PATIENCE).await.unwrap_or_else(|err| {
                panic!(
                    "connection {connections} after {last:?}: {} of {EVENTS} received: {err}; received {received:?}",
                    received.len()
                )
            });
            match item {
                Some(Item::Event(event)) => {
                    let index = event
                        .data
                        .strip_prefix('e')
                        .and_then(|i| i.parse::<usize>().ok())
                        .expect("an e<index> event");
                    last = event.id;
                    received.push((index, event.data));
                    read += 1;
                }
                Some(_) => {}
                None => {
                    last = stream.last_event_id().to_owned();
                    break;
                }
            }
        }
    }
    let published = publisher.await.expect("publisher");
    assert_eq!(published.len(), EVENTS);
    let mut indexes: Vec<usize> = received.iter().map(|(index, _)| *index).collect();
    for subject in subjects {
        let of_target: Vec<usize> = indexes
            .iter()
            .copied()
            .filter(|&i| target_of[i] == subject)
            .collect();
        assert!(
            of_target.windows(2).all(|pair| pair[0] < pair[1]),
            "{subject}'s events out of order or repeated across {connections} connections: {of_target:?}"
        );
    }
    indexes.sort_unstable();
    assert_eq!(
        indexes,
        (0..EVENTS).collect::<Vec<_>>(),
        "every event once across {connections} connections"
    );
}

/// A live message that never reaches the node is detected from the next
/// message's `Nats-Last-Sequence` and filled from the stream before it.
#[tokio::test]
async fn a_lost_live_message_is_detected_and_filled_from_the_stream() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node(&nats).await;
    let mut stream = SseClient::open(&node, "alice").await.expect("stream");
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let e1 = publish_to(&node, json!({"user": "alice", "data": "e1"})).await;
    assert_eq!(stream.next_event(PATIENCE).await.expect("e1").id, e1);

    let e2 = publish_losing_the_live_copy(&js, &node, json!({"user": "alice", "data": "e2"})).await;
    let e3 = publish_to(&node, json!({"user": "alice", "data": "e3"})).await;

    let events = stream.events(2).await.expect("events");
    assert_eq!([events[0].id.clone(), events[1].id.clone()], [e2, e3]);
    assert_eq!(metric(&node, "herald_gap_repairs_total"), 1);
}

/// Gap fills read stored events from the stream leader (`STREAM.MSG.GET`),
/// never with Direct Get, which any replica answers: a replica still catching
/// up answers "nothing after" for events the leader has already acknowledged,
/// and a read that trusts it skips them (the one-hour soak lost an event that
/// way after a leader kill). A replay uses batched Direct Gets (2.11+) whose
/// answers say how far they are complete, trusted only that far; on 2.10 it
/// reads from the leader. A plain NATS client listening on the JetStream API
/// subjects sees which reads the node makes.
#[tokio::test]
async fn a_gap_fill_reads_from_the_stream_leader_and_a_replay_from_a_replica_only_with_batched_reads()
 {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node(&nats).await;
    let mut reads = ReadWatch::start(&nats).await;

    // A replay: alice resumes after her first event.
    let first = publish_to(&node, json!({"user": "alice", "data": "e1"})).await;
    let missed = publish_to(&node, json!({"user": "alice", "data": "e2"})).await;
    let mut resumed = resume(&node, "alice", &first).await;
    assert_eq!(resumed.next_event(PATIENCE).await.expect("e2").id, missed);
    let replay = reads.take().await;
    if reads.batched_reads() {
        assert!(
            replay.direct >= 2,
            "the newest read and the run, each proving how far it is complete: {replay:?}"
        );
    } else {
        assert_eq!(replay.direct, 0, "2.10: {replay:?}");
        assert!(
            replay.leader >= 2,
            "2.10 replays from the leader: {replay:?}"
        );
    }

    // A gap fill: the live copy of e3 goes somewhere the node does not listen.
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let lost_live =
        publish_losing_the_live_copy(&js, &node, json!({"user": "alice", "data": "e3"})).await;
    let after = publish_to(&node, json!({"user": "alice", "data": "e4"})).await;
    let events = resumed.events(2).await.expect("events");
    assert_eq!(
        [events[0].id.clone(), events[1].id.clone()],
        [lost_live, after]
    );
    assert_eq!(metric(&node, "herald_gap_repairs_total"), 1);
    let gap_fill = reads.take().await;
    assert!(gap_fill.leader >= 1, "the gap fill reads from the leader");
    assert_eq!(gap_fill.direct, 0, "no gap fill read went to Direct Get");
}

/// Events for a user and a topic stored while the node was cut off from NATS
/// all reach a stream following both once the node is back, each target's in
/// its order; and the id written with each of them is enough to resume
/// exactly: a stream resumed from any of those ids gets exactly the events
/// that came after it, whatever order the two targets' events were written in.
#[tokio::test]
async fn events_stored_while_the_node_was_cut_off_all_arrive_and_every_id_resumes_exactly() {
    let nats = NatsServer::start().expect("nats-server");
    let upstream = nats
        .url()
        .trim_start_matches("nats://")
        .parse()
        .expect("nats address");
    let proxy = TcpProxy::start(upstream).await.expect("proxy");
    let through_proxy = format!("nats://{}", proxy.addr());
    let node = start_on_nats(through_proxy, |n| n.ignore_discovered_servers = true)
        .await
        .expect("node starts on NATS");
    let token = subscriber_token("alice", &["news"]);
    let mut stream = SseClient::connect(
        &node.url("/v1/stream?topic=news"),
        &[("authorization", &bearer(&token))],
    )
    .await
    .expect("stream");
    while stream.last_event_id().is_empty() {
        stream.next_item(PATIENCE).await.expect("opening frames");
    }
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let before = store(&js, "herald.user.alice", "before").await;
    assert!(
        own_id(&stream.next_event(PATIENCE).await.expect("live").id)
            .ends_with(&format!("-{before}"))
    );

    assert_eq!(metric(&node, "herald_nats_connected"), 1);
    // Fault: the node's NATS connection is cut and its reconnects held.
    proxy.hold();
    proxy.cut_all();
    wait_until("the node notices", PATIENCE, || {
        metric(&node, "herald_nats_connected") == 0
    })
    .await
    .expect("unready");
    let mut stored = Vec::new();
    for (subject, data) in [
        ("herald.user.alice", "u1"),
        ("herald.topic.news", "t1"),
        ("herald.user.alice", "u2"),
        ("herald.topic.news", "t2"),
        ("herald.topic.news", "t3"),
        ("herald.user.alice", "u3"),
    ] {
        stored.push(store(&js, subject, data).await);
    }
    proxy.release();

    let events = stream
        .events(stored.len())
        .await
        .expect("every event, same stream");
    let data: Vec<&str> = events.iter().map(|e| e.data.as_str()).collect();
    let of = |prefix: char| -> Vec<&str> {
        data.iter()
            .copied()
            .filter(|d| d.starts_with(prefix))
            .collect()
    };
    assert_eq!(
        of('u'),
        ["u1", "u2", "u3"],
        "the user's events in order: {data:?}"
    );
    assert_eq!(
        of('t'),
        ["t1", "t2", "t3"],
        "the topic's events in order: {data:?}"
    );

    // Resuming from the id of each event gets exactly the rest; one event
    // published after all of them comes next on every resumed stream, so
    // nothing more than the rest was sent.
    let mut resumed_streams = Vec::new();
    for (k, event) in events.iter().enumerate() {
        let mut resumed = SseClient::connect(
            &node.url("/v1/stream?topic=news"),
            &[
                ("authorization", &bearer(&token)),
                ("last-event-id", &event.id),
            ],
        )
        .await
        .expect("resumed stream");
        let rest = resumed
            .events(stored.len() - k - 1)
            .await
            .expect("the rest");
        let mut got: Vec<&str> = rest.iter().map(|e| e.data.as_str()).collect();
        let mut want: Vec<&str> = data[k + 1..].to_vec();
        got.sort_unstable();
        want.sort_unstable();
        assert_eq!(got, want, "resumed after {:?} ({})", event.data, event.id);
        resumed_streams.push(resumed);
    }
    publish_to(&node, json!({"user": "alice", "data": "marker"})).await;
    for mut resumed in resumed_streams {
        assert_eq!(
            resumed.next_event(PATIENCE).await.expect("marker").data,
            "marker"
        );
    }
}

/// When nats-server restarts under a connected client, the stream stays open,
/// `/readyz` reports the outage, and afterwards every event reaches the client
/// once and in order.
#[tokio::test]
async fn a_nats_restart_loses_and_duplicates_nothing() {
    let mut nats = NatsServer::start().expect("nats-server");
    let node = nats_node(&nats).await;
    let mut stream = SseClient::open(&node, "alice").await.expect("stream");
    let before = publish_to(&node, json!({"user": "alice", "data": "before"})).await;
    // The stream is live (its start-up replay is done) before NATS goes away.
    assert_eq!(
        stream.next_event(PATIENCE).await.expect("before").id,
        before
    );
    let mut published = Vec::new();
    let ready = || async {
        reqwest::get(node.admin_url("/readyz"))
            .await
            .expect("answered")
            .status()
            .as_u16()
    };
    assert_eq!(ready().await, 200);

    nats.kill();
    let mut unready = false;
    for _ in 0..200 {
        if ready().await == 503 {
            unready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(unready, "/readyz stayed ready while NATS was down");
    nats.restart().expect("nats-server back");
    // Publish with another client at once: the node may not have resubscribed
    // yet, and what it misses must come from the stream.
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    for i in 0..5 {
        let ack = js
            .publish("herald.user.alice", format!("after {i}").into())
            .await
            .expect("sent")
            .await
            .expect("stored");
        published.push(ack.sequence.to_string());
    }
    let events = stream
        .events(5)
        .await
        .expect("every event after the restart, on the same stream");
    for (event, seq) in events.iter().zip(&published) {
        assert!(
            event.id.ends_with(&format!("-{seq}")),
            "{} vs {seq}",
            event.id
        );
    }
    let mut ready_again = false;
    for _ in 0..200 {
        if ready().await == 200 {
            ready_again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(ready_again, "/readyz did not recover");
}

/// After the stream is deleted and recreated, an old id gets exactly one
/// `herald.reset` (epoch changed), not a replay from a reused sequence.
#[tokio::test]
async fn a_recreated_stream_resets_clients_with_old_ids() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node(&nats).await;
    let old = publish_to(&node, json!({"user": "alice", "data": "old"})).await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let config = js
        .get_stream("HERALD")
        .await
        .expect("stream")
        .cached_info()
        .config
        .clone();
    js.delete_stream("HERALD").await.expect("deleted");
    js.create_stream(config).await.expect("recreated");
    publish_to(&node, json!({"user": "alice", "data": "new 1"})).await;

    let mut stream = resume(&node, "alice", &old).await;
    let reset = stream.next_event(PATIENCE).await.expect("reset");
    assert_eq!(reset.event_type, "herald.reset");
    assert!(reset.data.contains("epoch_changed"), "{}", reset.data);
    assert_ne!(
        reset.id.split('-').next(),
        old.split('-').next(),
        "new epoch in the id"
    );
}

/// A stream deleted and recreated while clients are streaming: the new
/// history's first events reuse sequences already sent, so the open stream is
/// ended (with a `retry:` hint) instead of silently dropping them, and the
/// client's resume gets one `herald.reset`.
#[tokio::test]
async fn a_stream_recreated_under_open_streams_ends_them_and_resets_on_resume() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node(&nats).await;
    let mut stream = SseClient::open(&node, "alice").await.expect("stream");
    for data in ["old 1", "old 2"] {
        publish_to(&node, json!({"user": "alice", "data": data})).await;
    }
    assert_eq!(stream.events(2).await.expect("old events")[1].data, "old 2");
    let seen = stream.last_event_id().to_owned();

    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let config = js
        .get_stream("HERALD")
        .await
        .expect("stream")
        .cached_info()
        .config
        .clone();
    js.delete_stream("HERALD").await.expect("deleted");
    js.create_stream(config).await.expect("recreated");
    // Sequence 1 again: below what the open stream has seen.
    js.publish("herald.user.alice", "new 1".into())
        .await
        .expect("sent")
        .await
        .expect("stored");

    let rest = stream.until_end(PATIENCE).await.expect("the stream ends");
    assert!(
        !rest
            .iter()
            .any(|item| matches!(item, Item::Event(e) if e.data == "new 1")),
        "an event of the new history was sent on the old stream: {rest:?}"
    );
    assert!(
        rest.iter().any(|item| matches!(item, Item::Retry(_))),
        "{rest:?}"
    );
    let mut resumed = resume(&node, "alice", &seen).await;
    let reset = resumed.next_event(PATIENCE).await.expect("reset");
    assert_eq!(reset.event_type, "herald.reset", "{reset:?}");
    publish_to(&node, json!({"user": "alice", "data": "new 2"})).await;
    assert_eq!(
        resumed.next_event(PATIENCE).await.expect("live").data,
        "new 2"
    );
}

/// Acknowledged events lost by NATS (the store went back to an older copy,
/// as after lost writes): new events reuse sequences already sent under the
/// same epoch. The node notices before filling any gap, moves the epoch for
/// every node, and ends the stream; the resume gets one `herald.reset` — no
/// event is ever sent under an id the client already had.
#[tokio::test]
async fn acknowledged_events_lost_by_nats_end_streams_and_reset_them_on_resume() {
    let mut nats = NatsServer::start().expect("nats-server");
    let node = nats_node(&nats).await;
    let mut stream = SseClient::open(&node, "alice").await.expect("stream");
    publish_to(&node, json!({"user": "alice", "data": "kept"})).await;
    assert_eq!(
        stream.next_event(PATIENCE).await.expect("kept").data,
        "kept"
    );
    nats.copy_store().expect("store copied");
    let mut sent = Vec::new();
    for data in ["lost 1", "lost 2"] {
        sent.push(publish_to(&node, json!({"user": "alice", "data": data})).await);
    }
    let lost = stream.events(2).await.expect("events the store will lose");
    assert_eq!(lost.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), sent);

    nats.rewind().expect("store rewound");
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let mut reused = None;
    for _ in 0..100 {
        let attempt = async { js.publish("herald.user.alice", "after".into()).await?.await };
        match attempt.await {
            Ok(ack) => {
                reused = Some(ack.sequence);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let reused = reused.expect("NATS stores again after the rewind");
    assert!(
        sent.iter().any(|id| id.ends_with(&format!("-{reused}"))),
        "the rewound stream reuses a sequence already sent ({reused}, sent {sent:?})"
    );

    let rest = stream.until_end(PATIENCE).await.expect("the stream ends");
    assert!(
        !rest
            .iter()
            .any(|item| matches!(item, Item::Event(e) if e.data == "after")),
        "an event was sent under a sequence the client already had: {rest:?}"
    );
    // While the node checks the history, a resume is answered "come back
    // later" (200, a retry hint, the end); then it is served.
    let mut attempts = 0;
    let (mut resumed, reset) = loop {
        let mut client = resume(&node, "alice", &sent[1]).await;
        assert_eq!(client.status, 200);
        if let Ok(event) = client.next_event(PATIENCE).await {
            break (client, event);
        }
        attempts += 1;
        assert!(attempts < 100, "the resume was never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(reset.event_type, "herald.reset", "{reset:?}");
    assert_ne!(
        reset.id.split('-').next(),
        sent[1].split('-').next(),
        "a new epoch"
    );
    publish_to(&node, json!({"user": "alice", "data": "next"})).await;
    assert_eq!(
        resumed.next_event(PATIENCE).await.expect("live").data,
        "next"
    );
}

/// History evicted by the per-subject limit gives `herald.reset`, never a
/// silent skip.
#[tokio::test]
async fn history_evicted_per_subject_gives_a_reset() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node_with(&nats, |n| n.max_messages_per_subject = 3).await;
    let first = publish_to(&node, json!({"user": "alice", "data": "1"})).await;
    for i in 2..=5 {
        publish_to(&node, json!({"user": "alice", "data": i.to_string()})).await;
    }
    let mut stream = resume(&node, "alice", &first).await;
    let reset = stream.next_event(PATIENCE).await.expect("reset");
    assert_eq!(reset.event_type, "herald.reset");
    assert!(reset.data.contains("expired"), "{}", reset.data);
}

/// User ids that are NATS wildcards or contain dots are encoded into one safe
/// subject token: the user `*` or `alice.>` never receives alice's events.
#[tokio::test]
async fn wildcard_user_ids_cannot_read_other_users_on_nats() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node(&nats).await;
    for attacker in ["*", ">", "alice.>", "a b"] {
        let token = subscriber_token(attacker, &[]);
        let mut stream = SseClient::connect(
            &node.url("/v1/stream"),
            &[("authorization", &bearer(&token))],
        )
        .await
        .expect("stream");
        publish_to(&node, json!({"user": "alice", "data": "secret"})).await;
        publish_to(&node, json!({"user": attacker, "data": "sentinel"})).await;
        assert_eq!(
            stream.next_event(PATIENCE).await.expect("event").data,
            "sentinel",
            "{attacker}"
        );
    }
}

/// Events that cannot be delivered safely — a payload that is not UTF-8, a
/// `Herald-Event` with a control character (NATS framing itself cannot carry a
/// line break in a header), a reserved event type, an oversize payload — are
/// dropped and counted; the stream carries on with the next one.
#[tokio::test]
async fn undeliverable_events_are_dropped_and_counted_without_harm() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node_with(&nats, |n| n.max_event_bytes = 1024).await;
    let mut stream = SseClient::open(&node, "alice").await.expect("stream");
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let with_type = |event_type: &str| {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Herald-Event", event_type);
        headers
    };
    let bad: Vec<(async_nats::HeaderMap, bytes::Bytes)> = vec![
        (
            async_nats::HeaderMap::new(),
            bytes::Bytes::from_static(b"\xff\xfe not utf-8"),
        ),
        (with_type("x\u{7}\u{1b}[2Jdata: evil"), "injected".into()),
        (with_type("herald.reset"), "spoofed".into()),
        (async_nats::HeaderMap::new(), "x".repeat(2048).into()),
    ];
    for (headers, payload) in bad {
        js.publish_with_headers("herald.user.alice", headers, payload)
            .await
            .expect("sent")
            .await
            .expect("stored");
    }
    js.publish("herald.user.alice", "fine".into())
        .await
        .expect("sent")
        .await
        .expect("stored");
    let event = stream.next_event(PATIENCE).await.expect("event");
    assert_eq!(
        (event.event_type.as_str(), event.data.as_str()),
        ("message", "fine")
    );
    assert_eq!(metric(&node, "herald_bus_bad_events_total"), 4);
}

/// An existing stream whose configuration conflicts with what Herald needs
/// stops the node at start-up with a message naming the field, unless
/// `nats.update_stream` lets Herald fix it.
#[tokio::test]
async fn a_conflicting_stream_is_refused_unless_updates_are_allowed() {
    let nats = NatsServer::start().expect("nats-server");
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    js.create_stream(jetstream::stream::Config {
        name: "HERALD".into(),
        subjects: vec!["herald.user.*".into(), "herald.topic.*".into()],
        ..Default::default()
    })
    .await
    .expect("a stream without RePublish");
    let refused = start_on_nats(nats.url(), |_| {})
        .await
        .expect_err("refused");
    assert!(refused.to_string().contains("republish"), "{refused}");

    let node = start_on_nats(nats.url(), |n| n.update_stream = true)
        .await
        .expect("starts after updating the stream");
    let mut stream = SseClient::open(&node, "alice").await.expect("stream");
    let id = publish_to(&node, json!({"user": "alice", "data": "works"})).await;
    assert_eq!(stream.next_event(PATIENCE).await.expect("event").id, id);
}

/// Publishes `payload` with `headers` to alice's subject straight into
/// JetStream, and returns the acknowledgement or the refusal.
async fn publish_raw(
    js: &jetstream::Context,
    headers: async_nats::HeaderMap,
    payload: Vec<u8>,
) -> Result<jetstream::publish::PublishAck, jetstream::context::PublishError> {
    js.publish_with_headers("herald.user.alice", headers, payload.into())
        .await
        .expect("sent")
        .await
}

/// Whether JetStream refused a publish for being over the stream's
/// `max_msg_size` (and nothing else).
fn refused_as_too_large(
    answer: &Result<jetstream::publish::PublishAck, jetstream::context::PublishError>,
) -> bool {
    let Err(err) = answer else { return false };
    std::error::Error::source(err)
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
        .is_some_and(|e| e.error_code() == jetstream::ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM)
}

/// The stream refuses what no edge would deliver: a NATS publisher sending
/// a payload over `nats.max_event_bytes` plus the header allowance gets an
/// error instead of an acknowledgement, and nothing is stored. The limit
/// counts headers and payload, not the subject: a message of exactly
/// `max_message_bytes` is stored (and, its payload being over
/// `max_event_bytes`, dropped and counted by the edge). An event at
/// `max_event_bytes` carrying every header Herald reads at its longest is
/// stored and delivered whole.
#[tokio::test]
async fn an_oversize_event_is_refused_at_publish_time_and_one_at_the_limit_is_delivered() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node_with(&nats, |n| n.max_event_bytes = 1024).await;
    let limit = NatsSettings {
        max_event_bytes: 1024,
        ..NatsSettings::default()
    }
    .max_message_bytes();
    assert_eq!(limit, 1024 + herald_config::STREAM_HEADER_ALLOWANCE_BYTES);
    let mut stream = SseClient::open(&node, "alice").await.expect("stream");
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));

    let over = publish_raw(&js, async_nats::HeaderMap::new(), vec![b'x'; limit + 1]).await;
    assert!(refused_as_too_large(&over), "{over:?}");
    let mut herald = js.get_stream("HERALD").await.expect("stream");
    assert_eq!(herald.info().await.expect("info").state.messages, 0);

    let exactly = publish_raw(&js, async_nats::HeaderMap::new(), vec![b'x'; limit]).await;
    assert!(exactly.is_ok(), "the subject does not count: {exactly:?}");

    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Herald-Event", "e".repeat(128).as_str());
    headers.insert("Nats-Msg-Id", "m".repeat(256).as_str());
    headers.insert(
        "traceparent",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    );
    headers.insert("tracestate", format!("vendor={}", "v".repeat(505)).as_str());
    let at_limit = publish_raw(&js, headers, vec![b'y'; 1024]).await;
    assert!(at_limit.is_ok(), "{at_limit:?}");

    let event = stream.next_event(PATIENCE).await.expect("event");
    assert_eq!(event.event_type, "e".repeat(128));
    assert_eq!(event.data, "y".repeat(1024));
    assert_eq!(
        metric(&node, "herald_bus_bad_events_total"),
        1,
        "the message of exactly the stream's limit was over max_event_bytes"
    );
}

/// A stream made before Herald set a message size limit (JetStream's
/// default: none) is left alone while `nats.update_stream` is off — the node
/// starts, warns, and oversize messages are still stored — and is given the
/// limit when it is on, after which oversize messages are refused.
#[tokio::test]
async fn a_stream_without_the_size_limit_gets_it_only_under_update_stream() {
    let nats = NatsServer::start().expect("nats-server");
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    js.create_stream(jetstream::stream::Config {
        name: "HERALD".into(),
        subjects: vec!["herald.user.*".into(), "herald.topic.*".into()],
        republish: Some(jetstream::stream::Republish {
            source: "herald.>".into(),
            destination: "herald-live.>".into(),
            headers_only: false,
        }),
        ..Default::default()
    })
    .await
    .expect("a stream as an older Herald made it");
    let max_size = || async {
        let mut herald = js.get_stream("HERALD").await.expect("stream");
        herald.info().await.expect("info").config.max_message_size
    };
    let oversize = || vec![b'x'; 200 * 1024];

    let node = start_on_nats(nats.url(), |_| {})
        .await
        .expect("an outdated size limit does not stop the node");
    assert_eq!(max_size().await, -1, "left alone");
    let stored = publish_raw(&js, async_nats::HeaderMap::new(), oversize()).await;
    assert!(stored.is_ok(), "{stored:?}");
    node.stop().await.expect("stops");

    let node = start_on_nats(nats.url(), |n| n.update_stream = true)
        .await
        .expect("starts after updating the stream");
    let wanted = NatsSettings::default().max_message_bytes();
    assert_eq!(max_size().await, i32::try_from(wanted).expect("fits"));
    let refused = publish_raw(&js, async_nats::HeaderMap::new(), oversize()).await;
    assert!(refused_as_too_large(&refused), "{refused:?}");
    let mut stream = SseClient::open(&node, "alice").await.expect("stream");
    let id = publish_to(&node, json!({"user": "alice", "data": "still works"})).await;
    assert_eq!(stream.next_event(PATIENCE).await.expect("event").id, id);
}

/// A live copy whose previous sequence is not the last one the node
/// delivered for its target is never written as it is: here a forged copy
/// names a sequence far ahead, after a previous sequence the stream never
/// held. The node fills from the stream instead (which holds nothing of it),
/// drops the copy, and the target's real events keep flowing in order.
#[tokio::test]
async fn a_live_copy_that_does_not_connect_is_never_written_as_it_is() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node(&nats).await;
    let mut stream = SseClient::open(&node, "alice").await.expect("stream");
    let e1 = publish_to(&node, json!({"user": "alice", "data": "e1"})).await;
    assert_eq!(stream.next_event(PATIENCE).await.expect("e1").id, e1);
    let delivered = sequence_of(&e1);

    let client = async_nats::connect(nats.url()).await.expect("client");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Sequence", (delivered + 1_000).to_string().as_str());
    headers.insert("Nats-Last-Sequence", (delivered + 999).to_string().as_str());
    headers.insert("Nats-Time-Stamp", "2030-01-01T00:00:00.000000001Z");
    client
        .publish_with_headers("herald-live.user.alice", headers, "forged".into())
        .await
        .expect("sent");
    client.flush().await.expect("flushed");

    let e2 = publish_to(&node, json!({"user": "alice", "data": "e2"})).await;
    let e3 = publish_to(&node, json!({"user": "alice", "data": "e3"})).await;
    let events = stream.events(2).await.expect("e2, e3");
    assert_eq!(
        events
            .iter()
            .map(|e| (e.id.as_str(), e.data.as_str()))
            .collect::<Vec<_>>(),
        [(e2.as_str(), "e2"), (e3.as_str(), "e3")],
        "the forged copy was written, or pushed the real events aside"
    );
}

/// A copy of an event already delivered (a new leader re-sending what the
/// old one sent) is dropped silently; so is a copy that names a delivered
/// sequence with another store time while the stream still holds the
/// delivered event there (the stream is asked before anything is decided):
/// no reset, no stream ended, the next event follows.
#[tokio::test]
async fn a_resent_copy_is_dropped_and_a_reused_sequence_is_checked_against_the_stream() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node(&nats).await;
    let mut stream = SseClient::open(&node, "alice").await.expect("stream");
    let e1 = publish_to(&node, json!({"user": "alice", "data": "e1"})).await;
    assert_eq!(stream.next_event(PATIENCE).await.expect("e1").id, e1);

    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let stored = js
        .get_stream("HERALD")
        .await
        .expect("stream")
        .get_raw_message(sequence_of(&e1))
        .await
        .expect("e1 stored");
    let stamp = stored
        .time
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a time stamp");
    let client = js.client();
    for (stamp, data) in [
        (stamp.as_str(), "a re-send of e1"),
        ("2030-01-01T00:00:00Z", "another event under e1's sequence"),
    ] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Sequence", sequence_of(&e1).to_string().as_str());
        headers.insert("Nats-Last-Sequence", "0");
        headers.insert("Nats-Time-Stamp", stamp);
        client
            .publish_with_headers("herald-live.user.alice", headers, data.into())
            .await
            .expect("sent");
    }
    client.flush().await.expect("flushed");

    let e2 = publish_to(&node, json!({"user": "alice", "data": "e2"})).await;
    let next = stream.next_event(PATIENCE).await.expect("e2");
    assert_eq!((next.id.as_str(), next.data.as_str()), (e2.as_str(), "e2"));
    assert_eq!(metric(&node, "herald_history_changes_total"), 0);
}

/// A stored history that went back while the node's connection stayed up:
/// the stream is recreated under the same epoch (as a store restored from a
/// copy keeps it), and the user's next event lands beyond every sequence the
/// client had, after a previous sequence that is not the one delivered. The
/// chain does not connect and the delivered event no longer stands, so the
/// node ends the stream instead of writing the event, and the resume is told
/// with one `herald.reset`.
#[tokio::test]
async fn a_history_rewound_without_a_reconnect_ends_the_stream_and_resets_it() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node(&nats).await;
    let mut stream = SseClient::open(&node, "alice").await.expect("stream");
    let mut sent = Vec::new();
    for data in ["old 1", "old 2"] {
        sent.push(publish_to(&node, json!({"user": "alice", "data": data})).await);
    }
    assert_eq!(stream.events(2).await.expect("old events")[1].id, sent[1]);
    let epoch = sent[1].split('-').next().expect("epoch").to_owned();

    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let mut config = js
        .get_stream("HERALD")
        .await
        .expect("stream")
        .cached_info()
        .config
        .clone();
    config.metadata.insert("herald_epoch".into(), epoch);
    js.delete_stream("HERALD").await.expect("deleted");
    js.create_stream(config)
        .await
        .expect("recreated, same epoch");
    for _ in 0..3 {
        store(&js, "herald.user.bob", "someone else").await;
    }
    let new = store(&js, "herald.user.alice", "new history").await;
    assert!(new > sequence_of(&sent[1]), "beyond what the client had");

    let rest = stream.until_end(PATIENCE).await.expect("the stream ends");
    assert!(
        !rest
            .iter()
            .any(|item| matches!(item, Item::Event(e) if e.data == "new history")),
        "an event of the rewound history was written: {rest:?}"
    );
    let mut resumed = resume(&node, "alice", &sent[1]).await;
    let reset = resumed.next_event(PATIENCE).await.expect("reset");
    assert_eq!(reset.event_type, "herald.reset", "{reset:?}");
}

/// A live copy lost for a user who then receives nothing more still reaches
/// the stream: the periodic check finds the stored event that never arrived
/// and fills it, with no later event to reveal the gap.
#[tokio::test]
async fn a_lost_live_copy_of_a_quiet_target_arrives_without_another_event() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node_with(&nats, |n| n.check_interval_ms = 500).await;
    let mut stream = SseClient::open(&node, "alice").await.expect("stream");
    let e1 = publish_to(&node, json!({"user": "alice", "data": "e1"})).await;
    assert_eq!(stream.next_event(PATIENCE).await.expect("e1").id, e1);

    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let lost =
        publish_losing_the_live_copy(&js, &node, json!({"user": "alice", "data": "e2"})).await;
    let event = stream.next_event(PATIENCE).await.expect("the lost event");
    assert_eq!(
        (event.id.as_str(), event.data.as_str()),
        (lost.as_str(), "e2")
    );
    assert_eq!(metric(&node, "herald_gap_repairs_total"), 1);
}

/// The periodic check reads its targets a slice at a time, spread over the
/// interval: with more quiet users followed than one slice holds (one batched
/// read: 100 subjects with a live buffer of 101), a lost live copy still
/// reaches the first user and the last, in different slices.
#[tokio::test]
async fn the_periodic_check_reaches_every_target_when_a_round_takes_several_slices() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node_with(&nats, |n| {
        n.check_interval_ms = 600;
        n.subscription_capacity = 101;
    })
    .await;
    let users: Vec<String> = (0..250).map(|n| format!("user{n:03}")).collect();
    let mut streams = Vec::new();
    for user in &users {
        streams.push(SseClient::open(&node, user).await.expect("stream"));
    }
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    for (index, user) in [(0, &users[0]), (249, &users[249])] {
        let lost =
            publish_losing_the_live_copy(&js, &node, json!({"user": user, "data": "lost"})).await;
        let event = streams[index]
            .next_event(PATIENCE)
            .await
            .unwrap_or_else(|err| panic!("{user}'s lost event: {err}"));
        assert_eq!(
            (event.id.as_str(), event.data.as_str()),
            (lost.as_str(), "lost")
        );
    }
    assert_eq!(metric(&node, "herald_gap_repairs_total"), 2);
}

/// Between full rounds (the first, then every eighth) the periodic check
/// asks only for subjects with events after the position each chain was
/// checked complete through: quiet users cost it no stored message, and a
/// live copy lost after that position is still found and filled.
#[tokio::test]
async fn checks_between_full_rounds_are_answered_only_with_what_is_new() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node_with(&nats, |n| n.check_interval_ms = 200).await;
    let users = ["alice", "bob", "carol", "dave"];
    let mut streams = Vec::new();
    for user in users {
        let mut stream = SseClient::open(&node, user).await.expect("stream");
        let id = publish_to(&node, json!({"user": user, "data": "hello"})).await;
        assert_eq!(stream.next_event(PATIENCE).await.expect("hello").id, id);
        streams.push(stream);
    }
    // One round (one slice: four targets) after the events were delivered.
    let after_events = metric(&node, "herald_live_checks_total");
    wait_until("a check after the events", PATIENCE, || {
        metric(&node, "herald_live_checks_total") > after_events
    })
    .await
    .expect("checked");

    let checks = metric(&node, "herald_live_checks_total");
    let answers = metric(&node, "herald_live_check_answers_total");
    wait_until("four more rounds", PATIENCE, || {
        metric(&node, "herald_live_checks_total") >= checks + 4
    })
    .await
    .expect("checked");
    let answered = metric(&node, "herald_live_check_answers_total") - answers;
    let client = async_nats::connect(nats.url()).await.expect("client");
    if ReadWatch::version_batches(&client.server_info().version) {
        assert!(
            answered <= users.len() as u64,
            "four rounds over quiet users were answered with {answered} stored messages: \
             more than the one full round they may include"
        );
    } else {
        // nats-server 2.10 has no batched reads: every target is read from
        // the leader in every round, and nothing is left out.
        assert!(answered >= 4 * users.len() as u64, "2.10: {answered}");
    }

    let js = jetstream::new(client);
    let lost =
        publish_losing_the_live_copy(&js, &node, json!({"user": "carol", "data": "lost"})).await;
    let event = streams[2]
        .next_event(PATIENCE)
        .await
        .expect("the lost event");
    assert_eq!(
        (event.id.as_str(), event.data.as_str()),
        (lost.as_str(), "lost")
    );
    assert_eq!(metric(&node, "herald_gap_repairs_total"), 1);
}

/// Between full rounds, the periodic check leaves out a target whose live
/// copies keep connecting (each one showed its chain complete), and reads it
/// on its next visit: a copy lost just after one that connected, with
/// nothing published after it, is still found and filled.
#[tokio::test]
async fn a_target_whose_copies_keep_connecting_is_left_out_of_a_round_but_not_two() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node_with(&nats, |n| n.check_interval_ms = 200).await;
    let mut stream = SseClient::open(&node, "alice").await.expect("stream");
    // Busy: an event at a time, each delivered before the next, until a
    // round has left alice out (a round takes 200 ms; seven in eight are
    // since rounds).
    let busy_until = std::time::Instant::now() + PATIENCE;
    let mut busy = 0;
    while metric(&node, "herald_live_check_left_out_total") == 0 {
        assert!(
            std::time::Instant::now() < busy_until,
            "no round left out a target whose copies kept connecting ({busy} events)"
        );
        let id = publish_to(&node, json!({"user": "alice", "data": busy})).await;
        assert_eq!(
            stream.next_event(PATIENCE).await.expect("busy event").id,
            id
        );
        busy += 1;
    }

    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let delivered = publish_to(&node, json!({"user": "alice", "data": "delivered"})).await;
    assert_eq!(
        stream.next_event(PATIENCE).await.expect("delivered").id,
        delivered
    );
    let left_out = metric(&node, "herald_live_check_left_out_total");
    let lost =
        publish_losing_the_live_copy(&js, &node, json!({"user": "alice", "data": "lost"})).await;
    let event = stream.next_event(PATIENCE).await.expect("the lost event");
    assert_eq!(
        (event.id.as_str(), event.data.as_str()),
        (lost.as_str(), "lost")
    );
    assert_eq!(metric(&node, "herald_gap_repairs_total"), 1);
    // Only the visit right after "delivered" may have left alice out: the
    // one after it read her chain (nothing else connected meanwhile).
    let skipped = metric(&node, "herald_live_check_left_out_total") - left_out;
    assert!(
        skipped <= 1,
        "alice was left out of {skipped} visits in a row"
    );
}

/// The stream sequence of a single-target id (`<epoch>-<seq>`).
fn sequence_of(id: &str) -> u64 {
    id.rsplit('-')
        .next()
        .and_then(|seq| seq.parse().ok())
        .expect("an <epoch>-<seq> id")
}

/// Watches the requests nodes send to the stream's two read APIs: leader
/// reads (`STREAM.MSG.GET`) and Direct Gets (answered by any replica).
struct ReadWatch {
    observer: async_nats::Client,
    leader: async_nats::Subscriber,
    direct: async_nats::Subscriber,
}

/// Requests seen by a [`ReadWatch`].
#[derive(Debug, Clone, Copy)]
struct Reads {
    leader: usize,
    direct: usize,
}

impl ReadWatch {
    async fn start(nats: &NatsServer) -> ReadWatch {
        let observer = async_nats::connect(nats.url()).await.expect("observer");
        let leader = observer
            .subscribe("$JS.API.STREAM.MSG.GET.>")
            .await
            .expect("subscribe");
        let direct = observer
            .subscribe("$JS.API.DIRECT.GET.>")
            .await
            .expect("subscribe");
        observer.flush().await.expect("flush");
        ReadWatch {
            observer,
            leader,
            direct,
        }
    }

    /// Whether the server answers batched Direct Gets (nats-server 2.11+;
    /// `make test-nats-oldest` runs these tests on 2.10, which does not).
    fn batched_reads(&self) -> bool {
        Self::version_batches(&self.observer.server_info().version)
    }

    /// Whether nats-server `version` answers batched Direct Gets (2.11+).
    fn version_batches(version: &str) -> bool {
        let mut parts = version.split('.').map(|part| part.parse::<u64>().ok());
        match (parts.next().flatten(), parts.next().flatten()) {
            (Some(major), Some(minor)) => (major, minor) >= (2, 11),
            _ => panic!("unreadable server version {version}"),
        }
    }

    /// The requests sent since the last call. Every request a node sent
    /// reached the observer before its answer reached the node; a round trip
    /// makes sure they have been read.
    async fn take(&mut self) -> Reads {
        self.observer.flush().await.expect("flush");
        let count = |subscription: &mut async_nats::Subscriber| {
            std::iter::from_fn(|| subscription.next().now_or_never().flatten()).count()
        };
        Reads {
            leader: count(&mut self.leader),
            direct: count(&mut self.direct),
        }
    }
}

/// 40 missed events with room for 7 messages per batched read: the resume
/// reads them in several batches (or, on a server without batched Direct
/// Gets, one leader read each) and the client gets every one, in order.
#[tokio::test]
async fn a_resume_of_many_missed_events_reads_them_in_batches_and_gets_every_one_in_order() {
    const MISSED: usize = 40;
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node_with(&nats, |n| n.subscription_capacity = 8).await;
    let first = publish_to(&node, json!({"user": "alice", "data": "seen"})).await;
    let mut published = Vec::new();
    for i in 0..MISSED {
        published.push(publish_to(&node, json!({"user": "alice", "data": format!("m{i}")})).await);
    }
    let mut reads = ReadWatch::start(&nats).await;
    let mut resumed = resume(&node, "alice", &first).await;
    let events = resumed.events(MISSED).await.expect("every missed event");
    let ids: Vec<String> = events.iter().map(|event| event.id.clone()).collect();
    assert_eq!(ids, published);
    let data: Vec<String> = events.iter().map(|event| event.data.clone()).collect();
    let expected: Vec<String> = (0..MISSED).map(|i| format!("m{i}")).collect();
    assert_eq!(data, expected);

    let seen = reads.take().await;
    if reads.batched_reads() {
        // The event at the position and the 40 after it, 7 per read.
        assert!(
            seen.direct >= MISSED.div_ceil(7),
            "read in batches: {seen:?}"
        );
        assert!(
            seen.leader < 5,
            "not one leader read per missed event: {seen:?}"
        );
    } else {
        assert_eq!(seen.direct, 0, "2.10 has no batched Direct Get: {seen:?}");
        assert!(
            seen.leader >= MISSED,
            "2.10 reads each missed event from the leader: {seen:?}"
        );
    }
}

/// A user's and a topic's missed events interleaved with other users' (more
/// of each than one batched read holds): the resume gets exactly its own
/// targets' events, each once, in stream order.
#[tokio::test]
async fn a_resume_whose_events_interleave_with_other_subjects_gets_exactly_its_own() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node_with(&nats, |n| n.subscription_capacity = 5).await;
    let token = subscriber_token("alice", &["news"]);
    let mut first = SseClient::connect(
        &node.url("/v1/stream?topic=news"),
        &[("authorization", &bearer(&token))],
    )
    .await
    .expect("stream");
    publish_to(&node, json!({"user": "alice", "data": "seen"})).await;
    let last = first.next_event(PATIENCE).await.expect("seen").id;
    drop(first);
    let mut published = Vec::new();
    for i in 0..12 {
        published.push(publish_to(&node, json!({"user": "alice", "data": format!("a{i}")})).await);
        publish_to(&node, json!({"user": "bob", "data": "not for alice"})).await;
        published.push(publish_to(&node, json!({"topic": "news", "data": format!("n{i}")})).await);
        publish_to(&node, json!({"topic": "sport", "data": "not followed"})).await;
    }
    let mut resumed = SseClient::connect(
        &node.url("/v1/stream?topic=news"),
        &[("authorization", &bearer(&token)), ("last-event-id", &last)],
    )
    .await
    .expect("stream");
    let ids: Vec<String> = resumed
        .events(published.len())
        .await
        .expect("events")
        .into_iter()
        .map(|event| own_id(&event.id))
        .collect();
    assert_eq!(ids, published);
    let extra = publish_to(&node, json!({"user": "alice", "data": "live"})).await;
    assert_eq!(
        own_id(&resumed.next_event(PATIENCE).await.expect("live").id),
        extra,
        "nothing else was replayed before the live event"
    );
}

/// Many clients resume at once, each right after an event was published for
/// it: their replays share state reads, yet none takes a state read sent
/// before it arrived (which could end before its own event): every client
/// gets its event.
#[tokio::test]
async fn resumes_arriving_together_share_state_reads_yet_each_gets_the_event_published_just_before_it()
 {
    const CLIENTS: usize = 60;
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node(&nats).await;
    let mut before = Vec::new();
    for i in 0..CLIENTS {
        before.push(publish_to(&node, json!({"user": format!("u{i}"), "data": "seen"})).await);
    }
    let resumes = before.iter().enumerate().map(|(i, seen)| {
        let node = &node;
        async move {
            let user = format!("u{i}");
            let missed = publish_to(node, json!({"user": user, "data": "missed"})).await;
            let mut resumed = resume(node, &user, seen).await;
            let event = resumed
                .next_event(PATIENCE)
                .await
                .expect("the missed event");
            (event.id, missed)
        }
    });
    for (got, missed) in futures_util::future::join_all(resumes).await {
        assert_eq!(got, missed);
    }
}

/// The user and index an event of [`publish_rounds`] carries (`"<user>:<index>"`).
fn user_and_index(data: &str) -> (usize, u64) {
    let (user, index) = data.split_once(':').expect("<user>:<index>");
    (
        user.parse().expect("user number"),
        index.parse().expect("index"),
    )
}

/// Reads `stream` until it has delivered index `through` of `user`'s events:
/// every event is `user`'s own, each index one after the last (`after`, or
/// any first index when `None`). Returns the last index read.
async fn read_in_order(
    stream: &mut SseClient,
    user: usize,
    after: Option<u64>,
    through: u64,
) -> u64 {
    let mut last = after;
    while last.is_none_or(|last| last < through) {
        let event = stream.next_event(PATIENCE).await.expect("the next event");
        let (owner, index) = user_and_index(&event.data);
        assert_eq!(owner, user, "user {user} received another user's event");
        if let Some(last) = last {
            assert_eq!(
                index,
                last + 1,
                "user {user}: an event missing, repeated or out of order"
            );
        }
        last = Some(index);
    }
    last.unwrap_or(through)
}

/// Many users followed and unfollowed at once on one node (one NATS
/// connection, one shared live buffer) while their events flow: every stream
/// receives only its own user's events, none missing, repeated or out of
/// order; and once every stream has closed, the node receives nothing more
/// for those users (no subscription is left delivering).
#[tokio::test]
async fn users_followed_and_unfollowed_concurrently_on_one_connection_each_receive_exactly_their_own_events_in_order()
 {
    const USERS: usize = 24;
    const ROUNDS: usize = 4;
    let nats = NatsServer::start().expect("nats-server");
    let node = std::sync::Arc::new(nats_node(&nats).await);
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let mut probe = SseClient::open(&node, "probe").await.expect("stream");

    // Every user's events, round after round, until told to stop; returns
    // the last index published (every user has it).
    let publishing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let publisher = tokio::spawn({
        let js = js.clone();
        let publishing = std::sync::Arc::clone(&publishing);
        async move {
            // Paced: streams opened early are not read until the end.
            let mut pace = tokio::time::interval(Duration::from_millis(20));
            let mut index = 0u64;
            loop {
                pace.tick().await;
                let mut acks = Vec::with_capacity(USERS);
                for user in 0..USERS {
                    acks.push(
                        js.publish(
                            format!("herald.user.churn-{user}"),
                            format!("{user}:{index}").into(),
                        )
                        .await
                        .expect("sent"),
                    );
                }
                for ack in acks {
                    ack.await.expect("stored");
                }
                if !publishing.load(std::sync::atomic::Ordering::SeqCst) {
                    return index;
                }
                index += 1;
            }
        }
    });

    // Each user opens and closes its stream ROUNDS times, reading a few
    // events each time, then keeps one open.
    let mut users = Vec::new();
    for user in 0..USERS {
        let node = std::sync::Arc::clone(&node);
        users.push(tokio::spawn(async move {
            let name = format!("churn-{user}");
            for round in 0..ROUNDS {
                let mut stream = SseClient::open(&node, &name).await.expect("stream");
                let first = read_in_order(&mut stream, user, None, 0).await;
                let reads = 1 + ((user + round) % 4) as u64;
                read_in_order(&mut stream, user, Some(first), first + reads).await;
            }
            let mut stream = SseClient::open(&node, &name).await.expect("stream");
            let first = read_in_order(&mut stream, user, None, 0).await;
            (stream, first)
        }));
    }
    let mut open = Vec::new();
    for user in users {
        open.push(user.await.expect("user task"));
    }
    publishing.store(false, std::sync::atomic::Ordering::SeqCst);
    let last = publisher.await.expect("publisher");
    for (user, (stream, first)) in open.iter_mut().enumerate() {
        read_in_order(stream, user, Some(*first), last).await;
    }

    // Every stream closes: the node unfollows each user. Events for them
    // published before the probe's reach the node before it; once the
    // unsubscriptions took effect, the probe's is the only one received.
    drop(open);
    let mut round = 0;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let before = metric(&node, "herald_bus_messages_received_total");
        for user in 0..USERS {
            js.publish(format!("herald.user.churn-{user}"), "after".into())
                .await
                .expect("sent")
                .await
                .expect("stored");
        }
        let data = format!("probe-{round}");
        js.publish("herald.user.probe", data.clone().into())
            .await
            .expect("sent")
            .await
            .expect("stored");
        assert_eq!(probe.next_event(PATIENCE).await.expect("probe").data, data);
        if metric(&node, "herald_bus_messages_received_total") - before == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node still receives events of users no stream follows"
        );
        round += 1;
    }
}

/// A live buffer too small for a burst (`nats.subscription_capacity` = 2,
/// shared by every followed user) makes the NATS client drop copies as a
/// slow consumer. The drop asks for a check at once (the periodic one is ten
/// minutes away here), which fills what was dropped from the stream: every
/// user receives all its events, once, in order.
#[tokio::test]
async fn copies_dropped_by_an_overflowing_live_buffer_are_filled_from_the_stream_at_once() {
    const USERS: usize = 30;
    const EVENTS: u64 = 20;
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node_with(&nats, |n| {
        n.subscription_capacity = 2;
        n.check_interval_ms = 600_000;
    })
    .await;
    let mut streams = Vec::new();
    for user in 0..USERS {
        streams.push(
            SseClient::open(&node, &format!("burst-{user}"))
                .await
                .expect("stream"),
        );
    }
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let mut acks = Vec::new();
    for index in 0..EVENTS {
        for user in 0..USERS {
            acks.push(
                js.publish(
                    format!("herald.user.burst-{user}"),
                    format!("{user}:{index}").into(),
                )
                .await
                .expect("sent"),
            );
        }
    }
    for ack in acks {
        ack.await.expect("stored");
    }
    for (user, stream) in streams.iter_mut().enumerate() {
        let first = read_in_order(stream, user, None, 0).await;
        assert_eq!(first, 0, "user {user}: the first event is missing");
        read_in_order(stream, user, Some(first), EVENTS - 1).await;
    }
    assert!(
        metric(&node, "herald_nats_slow_consumer_total") > 0,
        "the burst never overflowed the live buffer: nothing was tested"
    );
}

/// A node whose targets linger `secs` after their last stream closes,
/// recording at most `max_events` each.
async fn lingering_node(nats: &NatsServer, secs: u64, max_events: usize) -> EdgeNode {
    nats_node_with(nats, |n| {
        n.linger_secs = secs;
        n.linger_max_events = max_events;
    })
    .await
}

/// Opens `user`'s stream fresh and returns its starting id (the id-only
/// frame a fresh stream begins with), with the stream closed again.
async fn fresh_position(node: &EdgeNode, user: &str) -> String {
    let mut stream = SseClient::open(node, user).await.expect("stream");
    while stream.last_event_id().is_empty() {
        stream.next_item(PATIENCE).await.expect("item");
    }
    stream.last_event_id().to_owned()
}

/// Publishes `count` events to `user` from a plain JetStream client (not
/// through any node); returns their data.
async fn publish_plain(js: &jetstream::Context, user: &str, count: usize) -> Vec<String> {
    let mut sent = Vec::new();
    for i in 0..count {
        let data = format!("{user}-{i}");
        js.publish(format!("herald.user.{user}"), data.clone().into())
            .await
            .expect("sent")
            .await
            .expect("stored");
        sent.push(data);
    }
    sent
}

/// `user` leaves `node` after opening a fresh stream, misses `count`
/// events published meanwhile (the node receives them: it still follows
/// the user), and comes back with its last id. Returns what was published,
/// what the returning stream replayed, and that stream.
async fn away_and_back(
    node: &EdgeNode,
    js: &jetstream::Context,
    user: &str,
    count: usize,
) -> (Vec<String>, Vec<String>, SseClient) {
    let position = fresh_position(node, user).await;
    lingering(node, 1).await;
    let missed = publish_plain(js, user, count).await;
    wait_until("the node received the missed events", PATIENCE, || {
        metric(node, "herald_bus_messages_received_total") == count as u64
    })
    .await
    .expect("received");
    let mut stream = resume(node, user, &position).await;
    let replayed = stream
        .events(count)
        .await
        .expect("replay")
        .into_iter()
        .map(|event| event.data)
        .collect();
    (missed, replayed, stream)
}

/// Waits until `node` has `count` lingering targets.
async fn lingering(node: &EdgeNode, count: u64) {
    wait_until("the node has the lingering targets", PATIENCE, || {
        metric(node, "herald_nats_lingering") == count
    })
    .await
    .expect("lingering");
}

/// A client that comes back to the node it left, within `nats.linger_secs`,
/// gets exactly what it missed from what the node recorded meanwhile, without
/// a read of the stream; then live events, with nothing lost or repeated at
/// the hand-over.
#[tokio::test]
async fn a_client_returning_to_the_same_node_resumes_from_what_the_node_recorded() {
    let nats = NatsServer::start().expect("nats-server");
    let node = lingering_node(&nats, 30, 32).await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let (missed, replayed, mut stream) = away_and_back(&node, &js, "alice", 5).await;
    assert_eq!(replayed, missed);
    assert_eq!(metric(&node, "herald_nats_recorded_replays_total"), 1);
    assert_eq!(metric(&node, "herald_nats_lingering"), 0);

    let after = publish_plain(&js, "alice", 1).await;
    assert_eq!(
        stream.next_event(PATIENCE).await.expect("live").data,
        after[0]
    );
}

/// Events keep arriving while a client leaves and comes back, again and
/// again, to the same node: every resume is answered from the record, and
/// the client sees every event once, in order.
#[tokio::test]
async fn a_client_coming_back_repeatedly_while_events_flow_sees_each_event_once_in_order() {
    const EVENTS: usize = 120;
    const ROUNDS: usize = 6;
    let nats = NatsServer::start().expect("nats-server");
    let node = lingering_node(&nats, 30, 1_000).await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let mut position = fresh_position(&node, "bob").await;
    let publisher = tokio::spawn(async move {
        let mut pace = tokio::time::interval(Duration::from_millis(5));
        for i in 0..EVENTS {
            pace.tick().await;
            js.publish("herald.user.bob", i.to_string().into())
                .await
                .expect("sent")
                .await
                .expect("stored");
        }
    });
    let mut next = 0;
    for round in 0..ROUNDS {
        lingering(&node, 1).await;
        let mut stream = resume(&node, "bob", &position).await;
        let reads = if round + 1 == ROUNDS {
            EVENTS - next
        } else {
            EVENTS / ROUNDS / 2
        };
        for _ in 0..reads {
            let event = stream.next_event(PATIENCE).await.expect("event");
            assert_eq!(event.data, next.to_string(), "round {round}");
            next += 1;
        }
        position = stream.last_event_id().to_owned();
    }
    publisher.await.expect("publisher");
    assert_eq!(next, EVENTS);
    assert_eq!(
        metric(&node, "herald_nats_recorded_replays_total"),
        ROUNDS as u64
    );
}

/// A client that missed more than a lingering target records, or whose
/// position is older than the record, is answered from the stream: it
/// still gets everything it missed.
#[tokio::test]
async fn a_client_that_missed_more_than_was_recorded_is_answered_from_the_stream() {
    let nats = NatsServer::start().expect("nats-server");
    let node = lingering_node(&nats, 30, 3).await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let (missed, replayed, _stream) = away_and_back(&node, &js, "carol", 6).await;
    assert_eq!(replayed, missed);
    assert_eq!(metric(&node, "herald_nats_recorded_replays_total"), 0);
}

/// A position the stream never reached is not taken on the record's word:
/// the client is reset, as on a node that kept nothing.
#[tokio::test]
async fn an_invented_position_on_a_lingering_target_gets_a_reset() {
    let nats = NatsServer::start().expect("nats-server");
    let node = lingering_node(&nats, 30, 32).await;
    let position = fresh_position(&node, "dave").await;
    lingering(&node, 1).await;
    let (epoch, seq) = own_id(&position)
        .split_once('-')
        .map(|(epoch, seq)| (epoch.to_owned(), seq.parse::<u64>().expect("seq")))
        .expect("id");
    let invented = format!("{epoch}-{}", seq + 1_000);
    let mut stream = resume(&node, "dave", &invented).await;
    let reset = stream.next_event(PATIENCE).await.expect("reset");
    assert_eq!(reset.event_type, "herald.reset");
    assert_eq!(metric(&node, "herald_nats_recorded_replays_total"), 0);
}

/// Once `nats.linger_secs` has passed, the target is released: the node
/// receives nothing more for it, and a client coming back is answered from
/// the stream.
#[tokio::test]
async fn a_lingering_target_is_released_when_its_time_is_up() {
    let nats = NatsServer::start().expect("nats-server");
    let node = lingering_node(&nats, 1, 32).await;
    let js = jetstream::new(async_nats::connect(nats.url()).await.expect("client"));
    let mut probe = SseClient::open(&node, "probe").await.expect("probe");
    let position = fresh_position(&node, "erin").await;
    lingering(&node, 1).await;
    lingering(&node, 0).await;

    let missed = publish_plain(&js, "erin", 2).await;
    let probed = publish_plain(&js, "probe", 1).await;
    assert_eq!(
        probe.next_event(PATIENCE).await.expect("probe").data,
        probed[0]
    );
    // The probe's copy came after erin's: had erin been followed, the node
    // would have received them first.
    assert_eq!(metric(&node, "herald_bus_messages_received_total"), 1);

    let mut stream = resume(&node, "erin", &position).await;
    let replayed: Vec<String> = stream
        .events(2)
        .await
        .expect("replay")
        .into_iter()
        .map(|event| event.data)
        .collect();
    assert_eq!(replayed, missed);
    assert_eq!(metric(&node, "herald_nats_recorded_replays_total"), 0);
}
