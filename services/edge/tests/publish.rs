//! `POST /v1/publish` as a backend sees it: credentials, validation, limits and
//! idempotency, each answered with a status and a JSON error naming the problem.
//! Some tests run on the NATS bus against a real nats-server (and one against
//! the real `herald-edge` binary), because that is where input ends up in
//! subjects and headers.

use herald_config::BusKind;
use herald_edge::{Claims, PublishClaim, expiry_in};
use herald_protocol::{EventType, MsgId, Target, TargetKind};
use herald_testkit::nats::NatsServer;
use herald_testkit::process::EdgeProcess;
use herald_testkit::{EdgeNode, PATIENCE, SseClient, publish, subscriber_token, token};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{Value, json};
use std::time::Duration;

const EDGE: &str = env!("CARGO_BIN_EXE_herald-edge");

async fn post(node: &EdgeNode, bearer: Option<&str>, body: &str) -> (u16, Value) {
    post_to(&node.url("/v1/publish"), bearer, body).await
}

async fn post_to(url: &str, bearer: Option<&str>, body: &str) -> (u16, Value) {
    let mut request = reqwest::Client::new()
        .post(url)
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
        (
            r#"{"user":"a","data":"x","event":"HERALD.reset"}"#,
            "invalid_event",
        ),
        (
            r#"{"user":"a","data":"x","event":"Herald.Anything"}"#,
            "invalid_event",
        ),
        (r#"{"user":"a\nb","data":"x"}"#, "invalid_user"),
        (r#"{"topic":"a\u0000b","data":"x"}"#, "invalid_topic"),
        (
            r#"{"user":"a","data":"x","msg_id":"m0\r\nX-Injected: 1"}"#,
            "invalid_msg_id",
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

/// A publisher credential named `sub`, allowed `grants` (any target when
/// `None`), valid for an hour.
fn publisher_named(sub: Option<&str>, grants: Option<&[&str]>) -> String {
    token(Claims {
        sub: sub.map(str::to_owned),
        herald_publish: Some(match grants {
            None => PublishClaim::All(true),
            Some(grants) => PublishClaim::Targets(grants.iter().map(|g| g.to_string()).collect()),
        }),
        exp: expiry_in(Duration::from_secs(3600)),
        ..Default::default()
    })
}

/// Publishes `body` with `credential` on `node` and returns (id, duplicate).
async fn publish_as(node: &EdgeNode, credential: &str, body: Value) -> (String, bool) {
    let (status, answer) = post(node, Some(credential), &body.to_string()).await;
    assert_eq!(status, 200, "{answer}");
    (
        answer["id"].as_str().expect("id").to_owned(),
        answer["duplicate"].as_bool().expect("duplicate"),
    )
}

/// The scoped-deduplication scenario, on whichever bus `node` runs.
async fn msg_ids_deduplicate_per_publisher_and_target(node: &EdgeNode) {
    let billing = publisher_named(Some("billing"), None);
    let mallory = publisher_named(Some("mallory"), Some(&["user:alice"]));
    // Tokens without `sub`: each token is its own publisher.
    let (anonymous_a, anonymous_b) = (
        publisher_named(None, None),
        publisher_named(None, Some(&["user:*"])),
    );
    let mut alice = SseClient::open(node, "alice")
        .await
        .expect("alice's stream");
    let mut bob = SseClient::open(node, "bob").await.expect("bob's stream");
    let to = |user: &str, data: &str| json!({"user": user, "data": data, "msg_id": "order-42"});

    let (billing_id, duplicate) = publish_as(node, &billing, to("alice", "from billing")).await;
    assert!(!duplicate);
    let (mallory_id, duplicate) = publish_as(node, &mallory, to("alice", "from mallory")).await;
    assert!(
        !duplicate,
        "another publisher's msg_id does not suppress this one"
    );
    assert_ne!(mallory_id, billing_id);
    let (anonymous_a_id, _) = publish_as(node, &anonymous_a, to("alice", "from a")).await;
    let (anonymous_b_id, duplicate) = publish_as(node, &anonymous_b, to("alice", "from b")).await;
    assert!(!duplicate, "two tokens without sub are two publishers");
    assert_ne!(anonymous_a_id, anonymous_b_id);

    assert_eq!(
        publish_as(node, &billing, to("alice", "from billing")).await,
        (billing_id.clone(), true),
        "a publisher retrying its own msg_id gets its own event's id back"
    );
    assert_eq!(
        publish_as(node, &mallory, to("alice", "from mallory")).await,
        (mallory_id.clone(), true),
        "and never learns another publisher's event id"
    );
    let (to_bob, duplicate) = publish_as(node, &billing, to("bob", "billing to bob")).await;
    assert!(
        !duplicate,
        "the same msg_id to another target is another event"
    );

    let (last, _) = publish_as(node, &billing, json!({"user": "alice", "data": "end"})).await;
    let events = alice.events(5).await.expect("alice's events");
    assert_eq!(
        events
            .iter()
            .map(|e| (e.id.as_str(), e.data.as_str()))
            .collect::<Vec<_>>(),
        [
            (billing_id.as_str(), "from billing"),
            (mallory_id.as_str(), "from mallory"),
            (anonymous_a_id.as_str(), "from a"),
            (anonymous_b_id.as_str(), "from b"),
            (last.as_str(), "end"),
        ],
        "every publisher's event stored and delivered once, no retry delivered"
    );
    let event = bob.next_event(PATIENCE).await.expect("bob's event");
    assert_eq!((event.id, event.data), (to_bob, "billing to bob".into()));
}

/// On the memory bus, a `msg_id` deduplicates only against the same
/// credential (its `sub`, or the token itself when it has none) publishing to
/// the same target: two publishers using one `msg_id` both get their events
/// stored and delivered; a publisher retrying its own gets `duplicate: true`
/// with its own event's id, never another publisher's.
#[tokio::test]
async fn on_the_memory_bus_a_msg_id_deduplicates_only_its_publishers_retries_to_its_target() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    msg_ids_deduplicate_per_publisher_and_target(&node).await;
}

/// The same on the NATS bus, where deduplication is JetStream's
/// `Nats-Msg-Id`: the edge stores a digest of publisher, target and `msg_id`
/// there, so publishers sharing one stream cannot collide.
#[tokio::test]
async fn on_the_nats_bus_a_msg_id_deduplicates_only_its_publishers_retries_to_its_target() {
    let nats = NatsServer::start().expect("nats-server");
    let url = nats.url();
    let node = EdgeNode::start(move |s| {
        s.bus.kind = BusKind::Nats;
        s.nats.url = url;
    })
    .await
    .expect("node starts on NATS");
    msg_ids_deduplicate_per_publisher_and_target(&node).await;
}

/// The header injection from issue 18 (`msg_id` with CR LF), which used to
/// panic inside the NATS client and close the connection unanswered, is a 400
/// naming the field on the NATS bus; so are event types and targets carrying
/// what a NATS header or subject cannot, and the node keeps publishing.
#[tokio::test]
async fn on_the_nats_bus_header_injection_in_any_field_is_a_400_naming_the_field() {
    let nats = NatsServer::start().expect("nats-server");
    let url = nats.url();
    let node = EdgeNode::start(move |s| {
        s.bus.kind = BusKind::Nats;
        s.nats.url = url;
    })
    .await
    .expect("node starts on NATS");
    let publisher = herald_testkit::publisher_token();
    for (body, code) in [
        (
            json!({"user": "a", "data": "x", "msg_id": "m0\r\nX-Injected: 1"}),
            "invalid_msg_id",
        ),
        (
            json!({"user": "a", "data": "x", "msg_id": "m\u{85}"}),
            "invalid_msg_id",
        ),
        (
            json!({"user": "a", "data": "x", "msg_id": " m"}),
            "invalid_msg_id",
        ),
        (
            json!({"user": "a", "data": "x", "msg_id": "m".repeat(257)}),
            "invalid_msg_id",
        ),
        (
            json!({"user": "a", "data": "x", "event": "e\r\nNats-Msg-Id: x"}),
            "invalid_event",
        ),
        (
            json!({"user": "a", "data": "x", "event": "e "}),
            "invalid_event",
        ),
        (json!({"user": "a\r\nb", "data": "x"}), "invalid_user"),
        (json!({"topic": "t\u{7f}", "data": "x"}), "invalid_topic"),
    ] {
        let (status, error) = post(&node, Some(&publisher), &body.to_string()).await;
        assert_eq!(
            (status, error["error"].as_str()),
            (400, Some(code)),
            "{body}"
        );
    }
    let (status, answer) = post(
        &node,
        Some(&publisher),
        r#"{"user":"a","data":"x","msg_id":"m0 X-Injected: 1"}"#,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
}

/// Which 400 a body deserves, in the order the edge checks its fields
/// (target, event, msg_id), judged with the protocol's own validators; `None`
/// when every field is valid and the publish must succeed.
fn expected_refusal(case: &PublishCase) -> Option<&'static str> {
    match (&case.user, &case.topic) {
        (None, None) => return Some("missing_target"),
        (Some(_), Some(_)) => return Some("ambiguous_target"),
        (Some(user), None) if Target::new(TargetKind::User, user).is_err() => {
            return Some("invalid_user");
        }
        (None, Some(topic)) if Target::new(TargetKind::Topic, topic).is_err() => {
            return Some("invalid_topic");
        }
        _ => {}
    }
    if case
        .event
        .clone()
        .is_some_and(|e| EventType::new(e).is_err())
    {
        return Some("invalid_event");
    }
    if case.msg_id.clone().is_some_and(|m| MsgId::new(m).is_err()) {
        return Some("invalid_msg_id");
    }
    None
}

/// One generated `POST /v1/publish` body.
#[derive(Debug, Clone)]
struct PublishCase {
    user: Option<String>,
    topic: Option<String>,
    event: Option<String>,
    msg_id: Option<String>,
    data: String,
}

impl PublishCase {
    fn body(&self) -> String {
        let mut body = json!({"data": self.data});
        for (field, value) in [
            ("user", &self.user),
            ("topic", &self.topic),
            ("event", &self.event),
            ("msg_id", &self.msg_id),
        ] {
            if let Some(value) = value {
                body[field] = json!(value);
            }
        }
        body.to_string()
    }
}

/// What a careless or hostile client puts in a field: anything at all,
/// header injections, bare control characters (C0, DEL, C1), whitespace
/// padding, the reserved prefix in any case, ordinary names, names around the
/// 256-byte limits, and very long values.
fn hostile_string() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z]{0,4}(\\r\\n|\\r|\\n)[A-Za-z: -]{0,12}",
        "[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}]{1,3}",
        "[ \\t\\u{a0}\\u{3000}]{0,2}[a-z]{1,4}[ \\t\\u{a0}]{0,2}",
        "(herald|HERALD|hErAlD)\\.[a-z]{0,6}",
        "[A-Za-z0-9_.*> ~-]{1,12}",
        "\\PC{60,90}",
        (250usize..262).prop_map(|n| "n".repeat(n)),
        (1_000usize..5_000).prop_map(|n| "y".repeat(n)),
    ]
}

fn publish_case() -> impl Strategy<Value = PublishCase> {
    (
        prop::option::weighted(0.9, hostile_string()),
        prop::option::weighted(0.2, hostile_string()),
        prop::option::of(hostile_string()),
        prop::option::of(hostile_string()),
        hostile_string(),
    )
        .prop_map(|(user, topic, event, msg_id, data)| PublishCase {
            user,
            topic,
            event,
            msg_id,
            data,
        })
}

/// No input panics a node. Arbitrary strings (control characters, CR/LF,
/// unicode, whitespace, the reserved prefix, very long values) in every field
/// of `POST /v1/publish`, sent to the real `herald-edge` binary on the NATS
/// bus: every request gets an answer; it is 200 exactly when the protocol's
/// validators accept every field, and otherwise the 400 naming the first bad
/// field; and the node's stderr never says `panicked`.
#[test]
fn arbitrary_publish_bodies_on_the_nats_bus_are_answered_and_never_panic_the_node() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let nats = NatsServer::start().expect("nats-server");
    let url = nats.url();
    let edge = runtime
        .block_on(EdgeProcess::start_capturing(
            EDGE.as_ref(),
            &[
                ("HERALD__BUS__KIND", "nats"),
                ("HERALD__NATS__URL", &url),
                ("HERALD__HTTP__PUBLISH_RATE_PER_SEC", "1000000"),
            ],
        ))
        .expect("herald-edge on NATS");
    let endpoint = edge.url("/v1/publish");
    let publisher = herald_testkit::publisher_token();
    let (accepted, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
    let mut runner = TestRunner::new(Config {
        cases: 400,
        failure_persistence: None,
        ..Config::default()
    });
    let outcome = runner.run(&publish_case(), |case| {
        let body = case.body();
        let answer = runtime.block_on(async {
            let response = reqwest::Client::new()
                .post(&endpoint)
                .bearer_auth(&publisher)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await?;
            let status = response.status().as_u16();
            Ok::<_, reqwest::Error>((status, response.json::<Value>().await?))
        });
        let (status, answer) =
            answer.map_err(|err| TestCaseError::fail(format!("no answer: {err}")))?;
        match expected_refusal(&case) {
            None => {
                prop_assert_eq!(status, 200, "{}", answer);
                accepted.set(accepted.get() + 1);
            }
            Some(code) => {
                prop_assert_eq!(
                    (status, answer["error"].as_str()),
                    (400, Some(code)),
                    "{}",
                    answer
                );
                refused.set(refused.get() + 1);
            }
        }
        Ok(())
    });
    let stderr = edge.stderr();
    assert!(!stderr.contains("panicked"), "the node panicked:\n{stderr}");
    if let Err(failure) = outcome {
        panic!("{failure}\nnode stderr:\n{stderr}");
    }
    eprintln!(
        "{} bodies published, {} refused",
        accepted.get(),
        refused.get()
    );
    assert!(
        accepted.get() >= 40 && refused.get() >= 40,
        "the generator exercises both outcomes: {} published, {} refused",
        accepted.get(),
        refused.get()
    );
    let ready = runtime.block_on(async {
        reqwest::get(edge.admin_url("/readyz"))
            .await
            .map(|r| r.status())
    });
    assert_eq!(ready.expect("readyz answers").as_u16(), 200);
}

/// A token whose `herald_publish` claim is `false` is neither a publisher nor
/// a subscriber, as docs/api.md says: publishing is 403 and opening a stream
/// is 403 (any `herald_publish` claim marks a publisher credential).
#[tokio::test]
async fn a_token_whose_publish_claim_is_false_can_neither_publish_nor_open_a_stream() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    let token = token(Claims {
        sub: Some("alice".into()),
        herald_publish: Some(PublishClaim::All(false)),
        exp: expiry_in(Duration::from_secs(60)),
        ..Default::default()
    });
    let (status, error) = post(&node, Some(&token), r#"{"user":"alice","data":"x"}"#).await;
    assert_eq!((status, error["error"].as_str()), (403, Some("forbidden")));
    let stream = SseClient::connect(
        &node.url("/v1/stream"),
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
    .expect("answered");
    assert_eq!(stream.status, 403);
    let query = SseClient::connect(&node.url(&format!("/v1/stream?access_token={token}")), &[])
        .await
        .expect("answered");
    assert_eq!(query.status, 403);
}
