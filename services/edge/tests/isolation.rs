//! Stream isolation: a token opens only its own user's stream and the topics it
//! grants, whatever the request tries. Each test proves both halves: the
//! attacker's stream is alive (it receives its own sentinel event) and it never
//! received the victim's event, which was published before the sentinel.

use herald_testkit::{EdgeNode, PATIENCE, SseClient, publish, subscriber_token};
use serde_json::json;

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Publishes to the victim, then to the attacker; the attacker's next event
/// must be its own sentinel.
async fn assert_isolated(
    node: &EdgeNode,
    attacker: &mut SseClient,
    attacker_target: serde_json::Value,
    victim: serde_json::Value,
) {
    let mut victim_event = victim.clone();
    victim_event["data"] = json!("secret");
    let (status, _) = publish(node, victim_event).await.expect("publish");
    assert_eq!(status, 200, "victim publish {victim}");
    let mut sentinel = attacker_target.clone();
    sentinel["data"] = json!("sentinel");
    let (status, _) = publish(node, sentinel).await.expect("publish");
    assert_eq!(status, 200);
    let event = attacker
        .next_event(PATIENCE)
        .await
        .expect("attacker stream alive");
    assert_eq!(
        event.data, "sentinel",
        "victim {victim} leaked to attacker {attacker_target}"
    );
}

/// User ids containing subject syntax (`.`, `*`, `>`), spaces, system
/// prefixes, look-alike letters or percent-encoding reach only themselves.
#[tokio::test]
async fn user_ids_with_subject_syntax_or_look_alikes_reach_only_themselves() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    let long = "x".repeat(256);
    for (attacker, victim) in [
        ("*", "alice"),
        (">", "alice"),
        ("alice.>", "alice"),
        ("a.b", "a"),
        ("a", "a.b"),
        ("a b", "a"),
        ("$SYS", "alice"),
        ("\u{430}lice", "alice"), // Cyrillic а
        ("alice%2E", "alice."),
        ("~YWxpY2U", "alice"), // the base64 spelling of "alice"
        (long.as_str(), "x"),
    ] {
        let token = subscriber_token(attacker, &[]);
        let mut stream = SseClient::connect(
            &node.url("/v1/stream"),
            &[("authorization", &bearer(&token))],
        )
        .await
        .expect("answered");
        assert_eq!(stream.status, 200, "attacker {attacker:?}");
        assert_isolated(
            &node,
            &mut stream,
            json!({"user": attacker}),
            json!({"user": victim}),
        )
        .await;
    }
}

/// A `user` query parameter, path tricks and a second token in the query do
/// not change whose stream is opened: the header token's `sub` decides.
#[tokio::test]
async fn request_parameters_and_paths_cannot_select_another_users_stream() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    let mallory = subscriber_token("mallory", &[]);
    let alice = subscriber_token("alice", &[]);
    for path in [
        "/v1/stream?user=alice".to_owned(),
        "/v1/stream?sub=alice&user_id=alice".to_owned(),
        format!("/v1/stream?access_token={alice}"),
    ] {
        let mut stream =
            SseClient::connect(&node.url(&path), &[("authorization", &bearer(&mallory))])
                .await
                .expect("answered");
        assert_eq!(stream.status, 200, "{path}");
        assert_isolated(
            &node,
            &mut stream,
            json!({"user": "mallory"}),
            json!({"user": "alice"}),
        )
        .await;
    }
    // Paths that normalise to the stream endpoint open mallory's own stream;
    // the others are not found. None opens alice's.
    for path in [
        "/v1/stream/../stream",
        "/v1/./stream",
        "/v1/stream/alice",
        "/v1//stream",
        "/v1/stream%2F..%2Falice",
    ] {
        let mut stream =
            SseClient::connect(&node.url(path), &[("authorization", &bearer(&mallory))])
                .await
                .expect("answered");
        if stream.status == 200 {
            assert_isolated(
                &node,
                &mut stream,
                json!({"user": "mallory"}),
                json!({"user": "alice"}),
            )
            .await;
        } else {
            assert_eq!(stream.status, 404, "{path}");
        }
    }
}

/// Topic grants are exact names or `prefix*` patterns: asking for a wider
/// pattern, a wildcard, or a topic outside the grant is refused, and a granted
/// topic whose name contains `*` is a literal name, not a wildcard.
#[tokio::test]
async fn topic_requests_wider_than_the_grant_are_refused() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    let token = subscriber_token("mallory", &["news-*"]);
    for topic in ["*", ">", "news", "new*", "admin", "news-.>"] {
        let refused = SseClient::connect(
            &node.url(&format!("/v1/stream?topic={}", urlencode(topic))),
            &[("authorization", &bearer(&token))],
        )
        .await
        .expect("answered");
        assert_eq!(
            refused.status,
            if topic == "news-.>" { 200 } else { 403 },
            "topic {topic:?}"
        );
    }
    // "news-*" is granted, and is just a topic with a star in its name.
    let mut literal = SseClient::connect(
        &node.url("/v1/stream?topic=news-%2A"),
        &[("authorization", &bearer(&token))],
    )
    .await
    .expect("answered");
    assert_eq!(literal.status, 200);
    assert_isolated(
        &node,
        &mut literal,
        json!({"topic": "news-*"}),
        json!({"topic": "news-eu"}),
    )
    .await;
}

/// Tokens for users beyond the name rules (too long, control characters) and
/// publisher credentials open no stream.
#[tokio::test]
async fn invalid_subjects_and_publisher_credentials_open_no_stream() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    for (token, status) in [
        (subscriber_token(&"x".repeat(257), &[]), 401),
        (subscriber_token("line\nbreak", &[]), 401),
        (subscriber_token("", &[]), 401),
        (herald_testkit::publisher_token(), 403),
    ] {
        let response = SseClient::connect(
            &node.url("/v1/stream"),
            &[("authorization", &bearer(&token))],
        )
        .await
        .expect("answered");
        assert_eq!(response.status, status);
    }
}

fn urlencode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}
