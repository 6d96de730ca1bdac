//! Cross-origin browser clients: CORS answers for configured origins only.

use herald_testkit::{EdgeNode, subscriber_token};

/// With `http.cors_allowed_origins` set, a preflight for `POST /v1/publish` from
/// a listed origin is allowed with credentials; another origin is refused with
/// a JSON 403.
#[tokio::test]
async fn listed_origins_get_cors_answers_and_others_are_refused() {
    let node =
        EdgeNode::start(|s| s.http.cors_allowed_origins = vec!["https://app.example.com".into()])
            .await
            .expect("node starts");
    let http = reqwest::Client::new();
    let preflight = |origin: &'static str| {
        http.request(reqwest::Method::OPTIONS, node.url("/v1/publish"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization, content-type",
            )
            .send()
    };
    let allowed = preflight("https://app.example.com")
        .await
        .expect("answered");
    assert_eq!(allowed.status().as_u16(), 200);
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(
        allowed.headers()["access-control-allow-credentials"],
        "true"
    );

    let refused = preflight("https://evil.example.com")
        .await
        .expect("answered");
    assert_eq!(refused.status().as_u16(), 403);
    let body: serde_json::Value = refused.json().await.expect("json");
    assert_eq!(body["error"], "cors_forbidden");

    let stream = http
        .get(node.url("/v1/stream"))
        .bearer_auth(subscriber_token("alice", &[]))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .expect("answered");
    assert_eq!(
        stream.headers()["access-control-allow-origin"],
        "https://app.example.com"
    );
}

/// Without configured origins no CORS headers are sent, and same-origin
/// requests carrying an `Origin` header still work.
#[tokio::test]
async fn without_configured_origins_no_cors_headers_are_sent() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    let response = reqwest::Client::new()
        .get(node.url("/v1/stream"))
        .bearer_auth(subscriber_token("alice", &[]))
        .header("origin", "https://app.example.com")
        .send()
        .await
        .expect("answered");
    assert_eq!(response.status().as_u16(), 200);
    assert!(
        !response
            .headers()
            .contains_key("access-control-allow-origin")
    );
}
