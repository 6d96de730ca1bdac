//! `GET /v1/stream` as a client sees it: framing, resume, reset, topics, auth,
//! slow clients, limits and shutdown. Every test runs a real node on an
//! ephemeral loopback port and reads the stream over a real socket with the
//! spec-conformant parser.

use herald_protocol::sse::Item;
use herald_testkit::{
    EdgeNode, PATIENCE, SseClient, publish, publish_to_user, subscriber_token, wait_until,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A fresh stream answers with the SSE headers, an opening comment, a `retry:`
/// hint inside the configured jitter range, and then delivers a published event
/// with its id, type and multi-line data intact.
#[tokio::test]
async fn a_fresh_stream_has_sse_headers_a_retry_hint_and_receives_typed_events() {
    let node = EdgeNode::start(|s| {
        s.stream.retry_ms = 500;
        s.stream.retry_jitter_ms = 100;
    })
    .await
    .expect("node starts");
    let mut client = SseClient::open(&node, "alice").await.expect("stream opens");
    assert_eq!(
        client.headers["content-type"],
        "text/event-stream; charset=utf-8"
    );
    assert_eq!(client.headers["cache-control"], "no-cache");
    assert_eq!(client.headers["x-accel-buffering"], "no");

    assert!(matches!(
        client.next_item(PATIENCE).await,
        Ok(Some(Item::Comment(_)))
    ));
    match client.next_item(PATIENCE).await.expect("item") {
        Some(Item::Retry(ms)) => assert!((500..=600).contains(&ms), "retry {ms}"),
        other => panic!("expected a retry hint, got {other:?}"),
    }

    let (status, body) = publish(
        &node,
        json!({"user": "alice", "event": "greeting", "data": "line one\nline two"}),
    )
    .await
    .expect("publish");
    assert_eq!(status, 200, "{body}");
    let event = client.next_event(PATIENCE).await.expect("event");
    assert_eq!(event.id, body["id"].as_str().expect("id"));
    assert_eq!(event.event_type, "greeting");
    assert_eq!(event.data, "line one\nline two");
}

/// A client that reconnects with `Last-Event-ID` (header or query parameter)
/// receives exactly the events it missed, in order, and then live events, with
/// no duplicate.
#[tokio::test]
async fn resuming_with_last_event_id_delivers_exactly_the_missed_events_then_live() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    let mut first = SseClient::open(&node, "alice").await.expect("stream opens");
    let mut published = Vec::new();
    for i in 0..3 {
        published.push(
            publish_to_user(&node, "alice", &format!("e{i}"))
                .await
                .expect("published"),
        );
    }
    let seen = first.events(3).await.expect("events");
    let last = seen[2].id.clone();
    drop(first);
    wait_until("the first stream is detached", PATIENCE, || {
        node.handle.connections() == 0
    })
    .await
    .expect("detached");

    for i in 3..6 {
        published.push(
            publish_to_user(&node, "alice", &format!("e{i}"))
                .await
                .expect("published"),
        );
    }
    let token = subscriber_token("alice", &[]);
    let mut header_resume = SseClient::connect(
        &node.url("/v1/stream"),
        &[("authorization", &bearer(&token)), ("last-event-id", &last)],
    )
    .await
    .expect("stream opens");
    let mut query_resume = SseClient::connect(
        &node.url(&format!(
            "/v1/stream?access_token={token}&last_event_id={last}"
        )),
        &[],
    )
    .await
    .expect("stream opens");
    published.push(
        publish_to_user(&node, "alice", "live")
            .await
            .expect("published"),
    );

    for client in [&mut header_resume, &mut query_resume] {
        let events = client.events(4).await.expect("events");
        let ids: Vec<_> = events.iter().map(|e| e.id.clone()).collect();
        assert_eq!(ids, published[3..]);
        let data: Vec<_> = events.iter().map(|e| e.data.as_str()).collect();
        assert_eq!(data, ["e3", "e4", "e5", "live"]);
    }
}

/// A fresh stream is told its starting position (an id-only frame), so a
/// client that drops before any event arrives still resumes without loss.
#[tokio::test]
async fn a_client_that_drops_before_its_first_event_still_gets_what_was_published_meanwhile() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    publish_to_user(&node, "alice", "before the stream")
        .await
        .expect("published");
    let mut client = SseClient::open(&node, "alice").await.expect("stream opens");
    // Comment and retry; the id-only frame with them dispatches no event but
    // sets the last event id.
    for _ in 0..2 {
        client.next_item(PATIENCE).await.expect("item");
    }
    let position = client.last_event_id().to_owned();
    assert!(position.ends_with("-1"), "position {position}");
    drop(client);

    let missed = publish_to_user(&node, "alice", "while away")
        .await
        .expect("published");
    let token = subscriber_token("alice", &[]);
    let mut again = SseClient::connect(
        &node.url("/v1/stream"),
        &[
            ("authorization", &bearer(&token)),
            ("last-event-id", &position),
        ],
    )
    .await
    .expect("stream opens");
    let event = again.next_event(PATIENCE).await.expect("event");
    assert_eq!(
        (event.id.as_str(), event.data.as_str()),
        (missed.as_str(), "while away")
    );
}

/// When the history a client needs is gone, or its id is not one Herald wrote,
/// the stream starts with exactly one `herald.reset` naming the reason, and then
/// continues live.
#[tokio::test]
async fn lost_history_or_an_unknown_id_gives_one_reset_then_live_events() {
    let node = EdgeNode::start(|s| s.memory.max_events = 3)
        .await
        .expect("node starts");
    let oldest = publish_to_user(&node, "alice", "old")
        .await
        .expect("published");
    for i in 0..5 {
        publish_to_user(&node, "alice", &format!("n{i}"))
            .await
            .expect("published");
    }
    let token = subscriber_token("alice", &[]);
    for (last_event_id, reason) in [
        (oldest.as_str(), "expired"),
        ("not-an-id", "unrecognised_id"),
        ("1-1", "epoch_changed"),
    ] {
        let mut client = SseClient::connect(
            &node.url("/v1/stream"),
            &[
                ("authorization", &bearer(&token)),
                ("last-event-id", last_event_id),
            ],
        )
        .await
        .expect("stream opens");
        let reset = client.next_event(PATIENCE).await.expect("reset");
        assert_eq!(reset.event_type, "herald.reset");
        let data: serde_json::Value = serde_json::from_str(&reset.data).expect("json");
        assert_eq!(data["reason"], reason);

        let live = publish_to_user(&node, "alice", "after reset")
            .await
            .expect("published");
        let event = client.next_event(PATIENCE).await.expect("event");
        assert_eq!(event.id, live, "the reset is followed by live events only");
    }
}

/// A stream carries the user's own events and the granted topics' events, never
/// another user's; a topic the token does not grant is refused with 403.
#[tokio::test]
async fn a_stream_carries_its_user_and_granted_topics_only() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    let token = subscriber_token("alice", &["news", "prices-*"]);
    let mut alice = SseClient::connect(
        &node.url("/v1/stream?topic=news&topic=prices-eur"),
        &[("authorization", &bearer(&token))],
    )
    .await
    .expect("stream opens");
    assert_eq!(alice.status, 200);

    let refused = SseClient::connect(
        &node.url("/v1/stream?topic=secret"),
        &[("authorization", &bearer(&token))],
    )
    .await
    .expect("answered");
    assert_eq!(refused.status, 403);

    for body in [
        json!({"user": "bob", "data": "for bob"}),
        json!({"topic": "secret", "data": "not granted"}),
        json!({"topic": "news", "data": "headline"}),
        json!({"user": "alice", "data": "for alice"}),
        json!({"topic": "prices-eur", "data": "1.08"}),
    ] {
        let (status, _) = publish(&node, body).await.expect("publish");
        assert_eq!(status, 200);
    }
    let data: Vec<_> = alice
        .events(3)
        .await
        .expect("events")
        .into_iter()
        .map(|e| e.data)
        .collect();
    assert_eq!(data, ["headline", "for alice", "1.08"]);
}

/// Streams are refused with 401 and a JSON error without a valid token, and
/// with 403 for a publisher credential; the token is accepted from the header,
/// the query string and the `herald_token` cookie.
#[tokio::test]
async fn stream_authentication_accepts_three_carriers_and_refuses_bad_tokens_with_json() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    let http = reqwest::Client::new();
    let status_and_error = |response: reqwest::Response| async move {
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.expect("json error body");
        (
            status,
            body["error"].as_str().unwrap_or_default().to_owned(),
        )
    };
    let url = node.url("/v1/stream");
    let none = http.get(&url).send().await.expect("answered");
    assert_eq!(status_and_error(none).await, (401, "unauthorized".into()));
    let forged = http
        .get(&url)
        .bearer_auth("eyJhbGciOiJub25lIn0.e30.")
        .send()
        .await
        .expect("answered");
    assert_eq!(status_and_error(forged).await, (401, "unauthorized".into()));
    let publisher = http
        .get(&url)
        .bearer_auth(herald_testkit::publisher_token())
        .send()
        .await
        .expect("answered");
    assert_eq!(status_and_error(publisher).await, (403, "forbidden".into()));

    let token = subscriber_token("alice", &[]);
    let by_cookie = SseClient::connect(
        &url,
        &[("cookie", &format!("theme=dark; herald_token={token}"))],
    )
    .await
    .expect("answered");
    assert_eq!(by_cookie.status, 200);
    let by_query = SseClient::connect(&format!("{url}?access_token={token}"), &[])
        .await
        .expect("answered");
    assert_eq!(by_query.status, 200);
}

/// A client that stops reading fills its bounded queue and is disconnected
/// (counted as slow), while a reading client of the same user gets every event.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_loose_without_hurting_others() {
    let node = EdgeNode::start(|s| s.stream.queue_capacity = 4)
        .await
        .expect("node starts");
    let token = subscriber_token("alice", &[]);
    let mut stalled = TcpStream::connect(node.addr).await.expect("connect");
    stalled
        .write_all(
            format!("GET /v1/stream HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .expect("request");
    let mut reader = SseClient::open(&node, "alice").await.expect("stream opens");
    wait_until("both streams are attached", PATIENCE, || {
        node.handle.connections() == 2
    })
    .await
    .expect("attached");

    // Big events fill the stalled socket's buffers, then its queue.
    let payload = "x".repeat(60_000);
    let mut published = 0;
    while node.handle.connections() == 2 {
        assert!(published < 2_000, "the stalled client was never cut loose");
        publish_to_user(&node, "alice", &payload)
            .await
            .expect("published");
        published += 1;
        let received = reader
            .next_event(PATIENCE)
            .await
            .expect("the reader keeps up");
        assert_eq!(received.data.len(), payload.len());
    }
    assert!(
        node.handle
            .metrics_text()
            .contains("herald_slow_disconnects_total 1")
    );
    assert!(
        node.handle
            .metrics_text()
            .contains("herald_disconnects_total{reason=\"slow\"} 1"),
        "{}",
        node.handle.metrics_text()
    );
    // The stalled socket was closed by the node: reading drains and hits EOF.
    let mut sink = vec![0u8; 1 << 20];
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match stalled.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the stalled connection was not closed");
}

/// On shutdown every open stream receives a `retry:` hint and ends, and the
/// node stops.
#[tokio::test]
async fn shutdown_ends_open_streams_with_a_retry_hint() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    let mut client = SseClient::open(&node, "alice").await.expect("stream opens");
    for _ in 0..2 {
        client.next_item(PATIENCE).await.expect("preamble");
    }
    node.stop().await.expect("node stops");
    let rest = client
        .until_end(PATIENCE)
        .await
        .expect("stream ends cleanly");
    assert!(matches!(rest.last(), Some(Item::Retry(_))), "{rest:?}");
}

/// A user may hold only `max_connections_per_user` streams on a node: the next
/// one is refused with 429, a JSON error and `Retry-After`.
#[tokio::test]
async fn too_many_streams_for_one_user_are_refused_with_429() {
    let node = EdgeNode::start(|s| s.stream.max_connections_per_user = 2)
        .await
        .expect("node starts");
    let _a = SseClient::open(&node, "alice").await.expect("first");
    let _b = SseClient::open(&node, "alice").await.expect("second");
    let token = subscriber_token("alice", &[]);
    let response = reqwest::Client::new()
        .get(node.url("/v1/stream"))
        .bearer_auth(token)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status().as_u16(), 429);
    assert!(response.headers().contains_key("retry-after"));
    let body: serde_json::Value = response.json().await.expect("json");
    assert_eq!(body["error"], "too_many_streams");
    let _bob = SseClient::open(&node, "bob")
        .await
        .expect("another user is unaffected");
}

/// Heartbeat comments are written on an idle stream.
#[tokio::test]
async fn an_idle_stream_receives_heartbeat_comments() {
    let node = EdgeNode::start(|s| s.stream.heartbeat_ms = 50)
        .await
        .expect("node starts");
    let mut client = SseClient::open(&node, "alice").await.expect("stream opens");
    let mut heartbeats = 0;
    while heartbeats < 3 {
        if let Some(Item::Comment(text)) = client.next_item(PATIENCE).await.expect("item") {
            if text.is_empty() {
                heartbeats += 1;
            }
        }
    }
}

/// After 10,000 streams opened and closed, the registry is empty and the
/// runtime holds no more tasks than before: nothing leaks per connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_connects_and_disconnects_leave_nothing_behind() {
    let node = EdgeNode::start(|s| s.stream.max_connections_per_user = 10_000)
        .await
        .expect("node starts");
    // An idle node runs three tasks (its run future and the accept loops of
    // the public and the admin listener); every other task belongs to a
    // connection.
    const IDLE_NODE_TASKS: usize = 3;
    let metrics = tokio::runtime::Handle::current().metrics();
    let warm_up = SseClient::open(&node, "warm-up")
        .await
        .expect("stream opens");
    drop(warm_up);
    wait_until("the node is idle", PATIENCE, || {
        metrics.num_alive_tasks() == IDLE_NODE_TASKS
    })
    .await
    .expect("node idle");
    let request = |user: usize| {
        let token = subscriber_token(&format!("user-{}", user % 500), &["news"]);
        format!(
            "GET /v1/stream?topic=news HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\n\r\n"
        )
    };
    let addr = node.addr;
    let mut workers = Vec::new();
    for worker in 0..50 {
        let requests: Vec<String> = (0..200).map(|i| request(worker * 200 + i)).collect();
        workers.push(tokio::spawn(async move {
            for request in requests {
                let mut socket = TcpStream::connect(addr).await.expect("connect");
                socket.write_all(request.as_bytes()).await.expect("request");
                let mut head = [0u8; 64];
                let read = socket.read(&mut head).await.expect("response");
                assert!(
                    head[..read].starts_with(b"HTTP/1.1 200"),
                    "{:?}",
                    String::from_utf8_lossy(&head[..read])
                );
            }
        }));
    }
    for worker in workers {
        worker.await.expect("worker");
    }
    wait_until("every stream is detached", PATIENCE, || {
        node.handle.connections() == 0 && node.handle.targets() == 0
    })
    .await
    .expect("registry empty");
    wait_until("connection tasks are gone", PATIENCE, || {
        metrics.num_alive_tasks() == IDLE_NODE_TASKS
    })
    .await
    .expect("no leaked tasks");
    assert!(
        node.handle
            .metrics_text()
            .contains("herald_connects_total 10001")
    );
}

/// Before its token expires a stream receives `herald.token-expiring` (with no
/// id, so the resume position stays put); at expiry the stream ends, and the
/// same token no longer opens one.
#[tokio::test]
async fn a_stream_is_warned_before_its_token_expires_and_ends_at_expiry() {
    let node = EdgeNode::start(|s| {
        s.auth.leeway_secs = 0;
        s.auth.expiry_warning_secs = 1;
    })
    .await
    .expect("node starts");
    let token = herald_testkit::token(herald_edge::Claims {
        sub: Some("alice".into()),
        exp: herald_edge::expiry_in(std::time::Duration::from_secs(2)),
        ..Default::default()
    });
    let url = node.url(&format!("/v1/stream?access_token={token}"));
    let mut client = SseClient::connect(&url, &[]).await.expect("stream opens");
    let published = publish_to_user(&node, "alice", "hello")
        .await
        .expect("published");
    assert_eq!(
        client.next_event(PATIENCE).await.expect("event").id,
        published
    );

    let warning = client.next_event(PATIENCE).await.expect("warning");
    assert_eq!(warning.event_type, "herald.token-expiring");
    let data: serde_json::Value = serde_json::from_str(&warning.data).expect("json");
    assert!(data["expires_at"].as_u64().is_some(), "{data}");
    assert_eq!(
        warning.id, published,
        "the warning does not move the resume position"
    );

    client
        .until_end(PATIENCE)
        .await
        .expect("the stream ends at expiry");
    assert!(
        node.handle
            .metrics_text()
            .contains("reason=\"token_expired\"")
    );
    let again = SseClient::connect(&url, &[]).await.expect("answered");
    assert_eq!(again.status, 401);
}

/// A node at `stream.max_connections` answers a new stream with 200, a
/// `retry:` hint and an immediate end (a browser reconnects after that, while
/// it would give up for good on a 503).
#[tokio::test]
async fn a_full_node_answers_200_with_a_retry_hint_and_ends_the_stream() {
    let node = EdgeNode::start(|s| s.stream.max_connections = 1)
        .await
        .expect("node starts");
    let _holder = SseClient::open(&node, "alice").await.expect("stream opens");
    let mut refused = SseClient::open(&node, "bob").await.expect("answered 200");
    let items = refused.until_end(PATIENCE).await.expect("ends");
    assert!(
        items.iter().any(|item| matches!(item, Item::Retry(_))),
        "{items:?}"
    );
    assert!(
        !items.iter().any(|item| matches!(item, Item::Event(_))),
        "{items:?}"
    );
    assert!(
        node.handle
            .metrics_text()
            .contains("herald_rejected_streams_total{reason=\"node_full\"} 1")
    );
}

/// Draining on shutdown: `/readyz` fails at once, a new stream is answered 200
/// with a `retry:` hint and ended (never an error a browser would give up on),
/// and every open stream ends with a `retry:` hint within the drain window.
#[tokio::test]
async fn draining_turns_unready_refuses_softly_and_closes_streams_with_retry() {
    let node = EdgeNode::start(|s| s.stream.drain_ms = 2_000)
        .await
        .expect("node starts");
    let open = SseClient::open_many(&node, 5).await.expect("streams");
    let readyz = node.admin_url("/readyz");
    let stream_url = node.url("/v1/stream");
    let stopping = tokio::spawn(node.stop());

    let mut unready = false;
    for _ in 0..100 {
        if reqwest::get(&readyz)
            .await
            .is_ok_and(|r| r.status().as_u16() == 503)
        {
            unready = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(unready, "/readyz never turned 503 while draining");
    let token = subscriber_token("late", &[]);
    let mut late = SseClient::connect(&stream_url, &[("authorization", &bearer(&token))])
        .await
        .expect("answered");
    assert_eq!(late.status, 200);
    let items = late.until_end(PATIENCE).await.expect("ends");
    assert!(matches!(items.last(), Some(Item::Retry(_))), "{items:?}");

    for mut client in open {
        let rest = client.until_end(PATIENCE).await.expect("stream ends");
        assert!(matches!(rest.last(), Some(Item::Retry(_))), "{rest:?}");
    }
    stopping.await.expect("joined").expect("node stops");
}
