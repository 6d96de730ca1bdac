//! Tokens never reach the logs: not on success, not on refusal, not on
//! malformed requests, even with every crate logging at TRACE level.

use std::io::Write;
use std::sync::{Arc, Mutex};

use herald_testkit::{EdgeNode, PATIENCE, SseClient, publish_to_user, subscriber_token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Streams opened, refused and cut, and publishes refused, with the token in
/// the query string, the header and the cookie: the token's text appears in
/// no log line.
#[tokio::test]
async fn no_token_ever_appears_in_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .init();

    let node = EdgeNode::start(|s| s.stream.max_connections_per_user = 1)
        .await
        .expect("node starts");
    let token = subscriber_token("alice", &["news"]);
    let signature = token.rsplit('.').next().expect("jwt signature").to_owned();

    let mut stream = SseClient::connect(
        &node.url(&format!("/v1/stream?access_token={token}&topic=news")),
        &[],
    )
    .await
    .expect("stream opens");
    publish_to_user(&node, "alice", "hello")
        .await
        .expect("published");
    stream.next_event(PATIENCE).await.expect("event");
    // Refused: per-user limit, topic not granted, tampered token, wrong carrier.
    for url in [
        format!("/v1/stream?access_token={token}"),
        format!("/v1/stream?access_token={token}&topic=secret"),
        format!("/v1/stream?access_token={token}x"),
    ] {
        let refused = SseClient::connect(&node.url(&url), &[])
            .await
            .expect("answered");
        assert_ne!(refused.status, 200, "{url}");
    }
    let cookie = SseClient::connect(
        &node.url("/v1/stream"),
        &[("cookie", &format!("herald_token={token}x"))],
    )
    .await
    .expect("answered");
    assert_eq!(cookie.status, 401);
    let publish = reqwest::Client::new()
        .post(node.url("/v1/publish"))
        .bearer_auth(&token)
        .body("{}")
        .send()
        .await
        .expect("answered");
    assert_eq!(publish.status().as_u16(), 403);
    // A malformed request line carrying the token.
    let mut raw = tokio::net::TcpStream::connect(node.addr)
        .await
        .expect("connect");
    raw.write_all(
        format!("GET /v1/stream?access_token={token} HTTP/1.1\r\nbad header\r\n\r\n").as_bytes(),
    )
    .await
    .expect("send");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, raw.read_to_end(&mut answer)).await;
    drop(stream);
    node.stop().await.expect("node stops");

    let logs = String::from_utf8_lossy(&captured.0.lock().expect("log buffer")).into_owned();
    assert!(logs.contains("stream opened"), "the capture works");
    assert!(!logs.contains(&signature), "a token leaked into the logs");
}
