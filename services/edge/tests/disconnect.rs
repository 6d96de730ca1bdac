//! `POST /v1/disconnect` against real nodes and a real nats-server: a user's
//! streams end on every node (after the reason event when one is given), only
//! a publisher granted the user may ask, a revocation keeps the user's older
//! tokens out of every node (204, on which a browser stops) while a newer
//! token works, and bad bodies are refused naming the field.

use std::time::{Duration, Instant};

use herald_config::BusKind;
use herald_edge::{Claims, PublishClaim, expiry_in, now_secs};
use herald_protocol::sse::Item;
use herald_testkit::nats::NatsServer;
use herald_testkit::{EdgeNode, PATIENCE, SseClient, publisher_token, token, wait_until};
use serde_json::{Value, json};

/// How long a disconnect may take to end a stream on any node. The order
/// itself takes milliseconds; this leaves room for a loaded machine.
const DISCONNECT_DEADLINE: Duration = Duration::from_secs(2);

/// A node on the NATS bus at `nats`, named `id`.
async fn nats_node(nats: &NatsServer, id: &str) -> EdgeNode {
    let url = nats.url();
    EdgeNode::start(|s| {
        s.bus.kind = BusKind::Nats;
        s.nats.url = url;
        s.node.id = Some(id.into());
    })
    .await
    .expect("node starts on NATS")
}

/// A subscriber token for `user` issued at `iat` (unix seconds).
fn token_issued_at(user: &str, iat: u64) -> String {
    token(Claims {
        sub: Some(user.into()),
        exp: expiry_in(Duration::from_secs(3600)),
        iat: Some(iat),
        ..Default::default()
    })
}

/// `POST /v1/disconnect` with `credential`; status and JSON body.
async fn disconnect(node: &EdgeNode, credential: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(node.url("/v1/disconnect"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(credential) = credential {
        request = request.bearer_auth(credential);
    }
    let response = request.send().await.expect("request");
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("body");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// Opens `user`'s stream on `node` with `token`; the status and the client.
async fn open_with(node: &EdgeNode, token: &str) -> SseClient {
    SseClient::connect(
        &node.url("/v1/stream"),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
    .expect("stream request")
}

/// Reads `client` until its stream ends (within [`DISCONNECT_DEADLINE`] of
/// `since`); returns the items it read.
async fn ended_in_time(client: &mut SseClient, since: Instant, node: &str) -> Vec<Item> {
    let items = client
        .until_end(DISCONNECT_DEADLINE)
        .await
        .unwrap_or_else(|err| panic!("the stream on {node} did not end: {err}"));
    let took = since.elapsed();
    assert!(
        took < DISCONNECT_DEADLINE,
        "the stream on {node} ended {took:?} after the request"
    );
    eprintln!("{node}: stream ended {took:?} after the disconnect request");
    items
}

/// The events among `items`, as (type, data).
fn events(items: &[Item]) -> Vec<(String, String)> {
    items
        .iter()
        .filter_map(|item| match item {
            Item::Event(event) => Some((event.event_type.clone(), event.data.clone())),
            _ => None,
        })
        .collect()
}

fn metric(node: &EdgeNode, line: &str) -> u64 {
    node.handle
        .metrics_text()
        .lines()
        .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
        .unwrap_or(0)
}

/// A user streaming on two nodes is disconnected from both by one request to
/// one of them: each stream gets the reason event, then a `retry:` hint, then
/// ends, within the deadline. Another user's stream stays open. Without
/// `revoke`, the same token opens a stream again at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_ends_the_users_streams_on_every_node_after_the_reason_event() {
    let nats = NatsServer::start().expect("nats-server");
    let a = nats_node(&nats, "node-a").await;
    let b = nats_node(&nats, "node-b").await;
    let mut on_a = SseClient::open(&a, "alice").await.expect("alice on a");
    let mut on_b = SseClient::open(&b, "alice").await.expect("alice on b");
    let _bob = SseClient::open(&b, "bob").await.expect("bob on b");

    let sent = Instant::now();
    let (status, answer) = disconnect(
        &a,
        Some(&publisher_token()),
        r#"{"user":"alice","reason":{"type":"logged-out","data":{"by":"admin"}}}"#,
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(
        answer,
        json!({"user": "alice", "revoked": false, "revoked_before": null})
    );
    for (client, node) in [(&mut on_a, "node-a"), (&mut on_b, "node-b")] {
        let items = ended_in_time(client, sent, node).await;
        assert_eq!(
            events(&items),
            [("logged-out".to_owned(), r#"{"by":"admin"}"#.to_owned())],
            "{node}: the reason event, and nothing else"
        );
        assert!(
            matches!(items.last(), Some(Item::Retry(_))),
            "{node}: ends with a retry hint: {items:?}"
        );
    }
    for node in [&a, &b] {
        wait_until("the node counted alice's stream ended", PATIENCE, || {
            metric(node, "herald_disconnects_total{reason=\"disconnected\"}") == 1
        })
        .await
        .expect("counted");
        assert_eq!(metric(node, "herald_user_disconnects_total"), 1);
    }
    assert_eq!(
        (a.handle.connections(), b.handle.connections()),
        (0, 1),
        "only bob's stream is left"
    );
    let again = open_with(&b, &token_issued_at("alice", now_secs() - 60)).await;
    assert_eq!(again.status, 200, "a disconnect alone does not revoke");
}

/// Only a publisher whose grant covers the user may disconnect them: no
/// credential is a 401, a subscriber token or a publisher granted other
/// targets a 403, and nothing ends; a publisher granted `user:alice` may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_publisher_granted_the_user_may_disconnect_them() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node(&nats, "node-a").await;
    let mut stream = SseClient::open(&node, "alice").await.expect("alice");
    let body = r#"{"user":"alice","revoke":true}"#;
    let granted = |targets: &[&str]| {
        token(Claims {
            sub: Some("svc".into()),
            herald_publish: Some(PublishClaim::Targets(
                targets.iter().map(|t| t.to_string()).collect(),
            )),
            exp: expiry_in(Duration::from_secs(60)),
            ..Default::default()
        })
    };

    assert_eq!(disconnect(&node, None, body).await.0, 401);
    let subscriber = token_issued_at("alice", now_secs());
    assert_eq!(disconnect(&node, Some(&subscriber), body).await.0, 403);
    let (status, answer) = disconnect(&node, Some(&granted(&["user:bob", "topic:*"])), body).await;
    assert_eq!((status, answer["error"].as_str()), (403, Some("forbidden")));
    assert_eq!(node.handle.connections(), 1, "the stream is still open");
    assert_eq!(metric(&node, "herald_user_disconnects_total"), 0);

    let sent = Instant::now();
    let (status, answer) = disconnect(&node, Some(&granted(&["user:ali*"])), body).await;
    assert_eq!(status, 202, "{answer}");
    ended_in_time(&mut stream, sent, "node-a").await;
}

/// `"revoke": true` ends the user's streams, and then every node answers the
/// user's tokens issued at or before the revocation with 204 (a browser's
/// EventSource stops on it), a token without `iat` too; a token issued after
/// it opens a stream. A node started afterwards reads the revocation from the
/// bucket. Other users are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_users_older_tokens_get_204_on_every_node_and_a_newer_token_works() {
    let nats = NatsServer::start().expect("nats-server");
    let a = nats_node(&nats, "node-a").await;
    let b = nats_node(&nats, "node-b").await;
    let old = token_issued_at("alice", now_secs() - 10);
    let mut on_a = open_with(&a, &old).await;
    let mut on_b = open_with(&b, &old).await;
    assert_eq!((on_a.status, on_b.status), (200, 200));

    let sent = Instant::now();
    let (status, answer) = disconnect(
        &b,
        Some(&publisher_token()),
        r#"{"user":"alice","revoke":true}"#,
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["revoked"], true);
    let revoked_before = answer["revoked_before"].as_u64().expect("a time");
    assert!(revoked_before.abs_diff(now_secs()) <= 2, "{answer}");
    for (client, node) in [(&mut on_a, "node-a"), (&mut on_b, "node-b")] {
        let items = ended_in_time(client, sent, node).await;
        assert!(
            events(&items).is_empty(),
            "{node}: no reason asked: {items:?}"
        );
    }

    let without_iat = herald_testkit::subscriber_token("alice", &[]);
    let c = nats_node(&nats, "node-c").await;
    for node in [&a, &b, &c] {
        for refused in [
            &old,
            &token_issued_at("alice", revoked_before),
            &without_iat,
        ] {
            let answer = open_with(node, refused).await;
            assert_eq!(answer.status, 204, "an older token on {}", node.addr);
            assert_eq!(answer.headers.get("content-length"), None);
        }
        let newer = open_with(node, &token_issued_at("alice", revoked_before + 1)).await;
        assert_eq!(newer.status, 200, "a newer token on {}", node.addr);
        let bob = open_with(node, &token_issued_at("bob", revoked_before - 10)).await;
        assert_eq!(bob.status, 200, "another user on {}", node.addr);
        assert_eq!(metric(node, "herald_revoked_refusals_total"), 3);
    }
    for node in [&a, &b] {
        wait_until("the node counted alice's stream revoked", PATIENCE, || {
            metric(node, "herald_disconnects_total{reason=\"revoked\"}") == 1
        })
        .await
        .expect("counted");
    }
}

/// A node that missed the order (cut off from NATS when it was sent) still
/// ends a revoked user's streams once the revocation reaches it through the
/// bucket, a couple of seconds later, and refuses the old token; simulated by
/// writing the entry straight into the bucket, with no order sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_heard_only_through_the_bucket_still_ends_the_users_streams() {
    let nats = NatsServer::start().expect("nats-server");
    let node = nats_node(&nats, "node-a").await;
    let old = token_issued_at("a.b", now_secs() - 10);
    let mut stream = open_with(&node, &old).await;
    assert_eq!(stream.status, 200);

    let client = async_nats::connect(nats.url()).await.expect("client");
    let bucket = async_nats::jetstream::new(client)
        .get_key_value("HERALD_REVOKED")
        .await
        .expect("the node created the bucket");
    let revoked_before = now_secs();
    // "a.b" is not a plain name: its key is its subject token, `~` written `=`.
    let key = format!("={}", "YS5i");
    bucket
        .put(
            &key,
            json!({"revoked_before": revoked_before}).to_string().into(),
        )
        .await
        .expect("stored");
    let stored = Instant::now();
    let items = stream.until_end(PATIENCE).await.expect("the stream ends");
    eprintln!(
        "stream ended {:?} after the entry was stored",
        stored.elapsed()
    );
    assert!(events(&items).is_empty(), "{items:?}");
    assert_eq!(open_with(&node, &old).await.status, 204);
    let newer = token_issued_at("a.b", revoked_before + 1);
    assert_eq!(open_with(&node, &newer).await.status, 200);
    assert_eq!(
        metric(&node, "herald_user_disconnects_total"),
        0,
        "no order was sent"
    );
}

/// With NATS gone, a disconnect is answered 503 `bus_unavailable` with
/// `Retry-After` in bounded time, with or without `revoke`, instead of
/// hanging while the client waits for the connection to come back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_a_disconnect_is_a_503_in_bounded_time() {
    let mut nats = NatsServer::start().expect("nats-server");
    let node = nats_node(&nats, "node-a").await;
    nats.kill();
    for body in [r#"{"user":"alice"}"#, r#"{"user":"alice","revoke":true}"#] {
        let asked = Instant::now();
        let (status, answer) = tokio::time::timeout(
            Duration::from_secs(15),
            disconnect(&node, Some(&publisher_token()), body),
        )
        .await
        .expect("answered in bounded time");
        assert_eq!(
            (status, answer["error"].as_str()),
            (503, Some("bus_unavailable")),
            "{body}: {answer}"
        );
        eprintln!("{body}: 503 after {:?}", asked.elapsed());
    }
}

/// On the memory bus (one node, no NATS) a disconnect and a revocation work
/// the same, kept in the node's memory.
#[tokio::test]
async fn on_the_memory_bus_a_revocation_ends_the_stream_and_refuses_older_tokens() {
    let node = EdgeNode::start(|_| {}).await.expect("node");
    let old = token_issued_at("a.b c", now_secs() - 10);
    let mut stream = open_with(&node, &old).await;
    assert_eq!(stream.status, 200);
    let sent = Instant::now();
    let (status, answer) = disconnect(
        &node,
        Some(&publisher_token()),
        r#"{"user":"a.b c","revoke":true,"reason":{"type":"banned"}}"#,
    )
    .await;
    assert_eq!(status, 202, "{answer}");
    let items = ended_in_time(&mut stream, sent, "memory").await;
    assert_eq!(events(&items), [("banned".to_owned(), "null".to_owned())]);
    let revoked_before = answer["revoked_before"].as_u64().expect("a time");
    assert_eq!(open_with(&node, &old).await.status, 204);
    let newer = token_issued_at("a.b c", revoked_before + 1);
    assert_eq!(open_with(&node, &newer).await.status, 200);
}

/// Bad bodies are refused with 400 and a code naming the field; nothing is
/// disconnected.
#[tokio::test]
async fn bad_bodies_are_refused_naming_the_field() {
    let node = EdgeNode::start(|_| {}).await.expect("node");
    let publisher = publisher_token();
    for (body, code) in [
        ("{", "invalid_json"),
        (r#"{"revoke":true}"#, "invalid_user"),
        (r#"{"user":"a\u0007b"}"#, "invalid_user"),
        (r#"{"user":["alice"]}"#, "invalid_user"),
        (r#"{"user":"alice","revoke":1}"#, "invalid_revoke"),
        (
            r#"{"user":"alice","reason":{"type":"herald.reset"}}"#,
            "invalid_reason",
        ),
        (
            r#"{"user":"alice","reason":{"data":"x"}}"#,
            "invalid_reason",
        ),
        (r#"{"user":"alice","why":"x"}"#, "unknown_field"),
    ] {
        let (status, answer) = disconnect(&node, Some(&publisher), body).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (400, Some(code)),
            "{body}: {answer}"
        );
    }
    assert_eq!(metric(&node, "herald_user_disconnects_total"), 0);
}
