//! `POST /v1/publish` as a backend sees it: credentials, validation, limits and
//! idempotency, each answered with a status and a JSON error naming the problem.

use herald_edge::auth::{Claims, PublishClaim, expiry_in};
use herald_testkit::{EdgeNode, SseClient, publish, subscriber_token, token};
use serde_json::{Value, json};
use std::time::Duration;

async fn post(node: &EdgeNode, bearer: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(node.url("/v1/publish"))
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(bearer) = bearer {
        request = request.bearer_auth(bearer);
    }
    let response = request.send().await.expect("answered");
    let status = response.status().as_u16();
    (status, response.json().await.expect("json body"))
}

/// Publishing needs a publisher credential: none is 401, a subscriber token is
/// 403, and a credential limited to some targets is 403 for the others.
#[tokio::test]
async fn only_publisher_credentials_publish_and_only_where_they_are_allowed() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    let body = r#"{"user":"alice","data":"x"}"#;
    assert_eq!(post(&node, None, body).await.0, 401);
    let (status, error) = post(&node, Some(&subscriber_token("alice", &[])), body).await;
    assert_eq!((status, error["error"].as_str()), (403, Some("forbidden")));

    let limited = token(Claims {
        herald_publish: Some(PublishClaim::Targets(vec!["topic:news-*".into()])),
        exp: expiry_in(Duration::from_secs(60)),
        ..Default::default()
    });
    assert_eq!(post(&node, Some(&limited), body).await.0, 403);
    let (status, answer) = post(&node, Some(&limited), r#"{"topic":"news-eu","data":"x"}"#).await;
    assert_eq!(status, 200, "{answer}");
}

/// Malformed bodies are refused with 400 and an error code naming the problem;
/// nothing is stored, so the next valid event gets the next sequence.
#[tokio::test]
async fn invalid_bodies_are_refused_with_a_named_error_and_store_nothing() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    let publisher = herald_testkit::publisher_token();
    for (body, code) in [
        ("{", "invalid_json"),
        (r#"{"data":"x"}"#, "missing_target"),
        (r#"{"user":"a","topic":"b","data":"x"}"#, "ambiguous_target"),
        (
            r#"{"user":"a","data":"x","event":"x\r\ndata: evil"}"#,
            "invalid_event",
        ),
        (
            r#"{"user":"a","data":"x","event":"herald.reset"}"#,
            "invalid_event",
        ),
    ] {
        let (status, error) = post(&node, Some(&publisher), body).await;
        assert_eq!(
            (status, error["error"].as_str()),
            (400, Some(code)),
            "{body}"
        );
        assert!(error["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (status, answer) = post(&node, Some(&publisher), r#"{"user":"a","data":"ok"}"#).await;
    assert_eq!(status, 200);
    assert!(
        answer["id"].as_str().expect("id").ends_with("-1"),
        "{answer}"
    );
}

/// A body over `http.max_body_bytes` is refused with 413, whether its size is
/// declared or it arrives chunked.
#[tokio::test]
async fn an_oversize_body_is_refused_with_413() {
    let node = EdgeNode::start(|s| s.http.max_body_bytes = 1024)
        .await
        .expect("node starts");
    let big = json!({"user": "alice", "data": "x".repeat(2000)}).to_string();
    let (status, error) = post(&node, Some(&herald_testkit::publisher_token()), &big).await;
    assert_eq!(
        (status, error["error"].as_str()),
        (413, Some("body_too_large"))
    );

    let chunks = vec![
        Ok::<_, std::io::Error>(big[..1000].to_owned()),
        Ok(big[1000..].to_owned()),
    ];
    let response = reqwest::Client::new()
        .post(node.url("/v1/publish"))
        .bearer_auth(herald_testkit::publisher_token())
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status().as_u16(), 413);
}

/// A retry with the same `msg_id` answers the original id with
/// `duplicate: true`, and subscribers receive the event once.
#[tokio::test]
async fn a_retried_publish_with_the_same_msg_id_is_delivered_once() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    let mut client = SseClient::open(&node, "alice").await.expect("stream opens");
    let body = json!({"user": "alice", "data": "once", "msg_id": "order-42"});
    let (_, first) = publish(&node, body.clone()).await.expect("publish");
    let (_, retry) = publish(&node, body).await.expect("publish");
    assert_eq!(first["duplicate"], false);
    assert_eq!(retry["duplicate"], true);
    assert_eq!(first["id"], retry["id"]);
    let (_, next) = publish(&node, json!({"user": "alice", "data": "next"}))
        .await
        .expect("publish");

    let events = client.events(2).await.expect("events");
    assert_eq!(events[0].data, "once");
    assert_eq!(
        events[1].id,
        next["id"].as_str().expect("id"),
        "no second copy in between"
    );
}

/// A credential publishing faster than `http.publish_rate_per_sec` gets 429
/// with `Retry-After`; another credential is not affected.
#[tokio::test]
async fn a_publisher_over_its_rate_gets_429_and_others_do_not() {
    let node = EdgeNode::start(|s| s.http.publish_rate_per_sec = 5)
        .await
        .expect("node starts");
    let credential = |sub: &str| {
        token(Claims {
            sub: Some(sub.into()),
            herald_publish: Some(PublishClaim::All(true)),
            exp: expiry_in(Duration::from_secs(60)),
            ..Default::default()
        })
    };
    let (busy, quiet) = (credential("busy-service"), credential("quiet-service"));
    let body = r#"{"user":"alice","data":"x"}"#;
    for _ in 0..5 {
        assert_eq!(post(&node, Some(&busy), body).await.0, 200);
    }
    let response = reqwest::Client::new()
        .post(node.url("/v1/publish"))
        .bearer_auth(&busy)
        .body(body)
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status().as_u16(), 429);
    assert_eq!(response.headers()["retry-after"], "1");
    let error: Value = response.json().await.expect("json");
    assert_eq!(error["error"], "rate_limited");
    assert_eq!(post(&node, Some(&quiet), body).await.0, 200);
}
