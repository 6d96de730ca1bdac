//! Hostile and broken HTTP: nothing a client sends can take a node down or stop
//! it from serving others.

use herald_testkit::{EdgeNode, PATIENCE, subscriber_token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes and returns everything the node answers before closing (or
/// what arrived within `PATIENCE`).
async fn raw_exchange(node: &EdgeNode, request: &[u8]) -> String {
    let mut socket = TcpStream::connect(node.addr).await.expect("connect");
    socket.write_all(request).await.expect("send");
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, socket.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// The node is alive (admin `/healthz`) and its public listener still answers
/// (a stream request without a token: 401).
async fn still_healthy(node: &EdgeNode) {
    let status = reqwest::get(node.admin_url("/healthz"))
        .await
        .expect("answered")
        .status();
    assert_eq!(status.as_u16(), 200);
    let status = reqwest::get(node.url("/v1/stream"))
        .await
        .expect("answered")
        .status();
    assert_eq!(status.as_u16(), 401);
}

/// A garbage request line gets 400 and the node keeps serving.
#[tokio::test]
async fn garbage_request_lines_get_400_and_the_node_keeps_serving() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    for garbage in [
        &b"\x00\x01\x02 garbage\r\n\r\n"[..],
        b"GET\r\n\r\n",
        b"HELLO / HTTP/9.9\r\n\r\n",
    ] {
        let answer = raw_exchange(&node, garbage).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    }
    still_healthy(&node).await;
}

/// A request head larger than `http.max_header_bytes` gets 431.
#[tokio::test]
async fn oversize_headers_get_431() {
    let node = EdgeNode::start(|s| s.http.max_header_bytes = 8192)
        .await
        .expect("node starts");
    let request = format!(
        "GET /healthz HTTP/1.1\r\nhost: x\r\nx-padding: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let answer = raw_exchange(&node, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    still_healthy(&node).await;
}

/// A request with more headers than the node accepts gets 431.
#[tokio::test]
async fn too_many_headers_get_431() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    let headers: String = (0..100).map(|i| format!("x-h{i}: v\r\n")).collect();
    let request = format!("GET /healthz HTTP/1.1\r\nhost: x\r\n{headers}\r\n");
    let answer = raw_exchange(&node, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
    still_healthy(&node).await;
}

/// A client that never finishes its headers (slowloris) is disconnected after
/// `http.header_read_timeout_ms`.
#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let node = EdgeNode::start(|s| s.http.header_read_timeout_ms = 200)
        .await
        .expect("node starts");
    let mut socket = TcpStream::connect(node.addr).await.expect("connect");
    socket
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n")
        .await
        .expect("send");
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the slow client was never disconnected");
    still_healthy(&node).await;
}

/// Invalid UTF-8 and odd encodings in the query string, unknown paths and
/// wrong methods get JSON errors, never a crash.
#[tokio::test]
async fn odd_queries_paths_and_methods_get_json_errors() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    let http = reqwest::Client::new();
    for (method, path, status) in [
        ("GET", "/v1/stream?access_token=%FF%FE%00", 401),
        ("GET", "/v1/stream?topic=%E2%80%AE&access_token=x", 401),
        ("GET", "/v1/../v1/stream", 401),
        ("GET", "/nope", 404),
        ("DELETE", "/v1/stream", 405),
        ("GET", "/v1/publish", 405),
    ] {
        let response = http
            .request(method.parse().expect("method"), node.url(path))
            .send()
            .await
            .expect("answered");
        assert_eq!(response.status().as_u16(), status, "{method} {path}");
        let body: serde_json::Value = response.json().await.expect("json error");
        assert!(body["error"].is_string(), "{method} {path}: {body}");
    }
    still_healthy(&node).await;
}

/// A `Last-Event-ID` that is not ASCII text is refused with 400.
#[tokio::test]
async fn a_non_ascii_last_event_id_is_refused() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    let token = subscriber_token("alice", &[]);
    let request = format!(
        "GET /v1/stream HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\nlast-event-id: \u{e9}\r\nconnection: close\r\n\r\n"
    );
    let answer = raw_exchange(&node, request.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer:?}");
    assert!(answer.contains("invalid_last_event_id"), "{answer:?}");
}

/// A client that half-closes its socket right after the request still gets its
/// answer, and many abandoned connections do not stop the node.
#[tokio::test]
async fn half_closed_and_abandoned_sockets_do_not_disturb_the_node() {
    let node = EdgeNode::start(|_| {}).await.expect("node starts");
    let mut socket = TcpStream::connect(node.addr).await.expect("connect");
    socket
        .write_all(b"GET /v1/publish HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .expect("send");
    socket.shutdown().await.expect("half close");
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, socket.read_to_string(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer:?}");
    assert!(answer.contains("method_not_allowed"), "{answer:?}");

    let mut abandoned = Vec::new();
    for _ in 0..200 {
        let mut socket = TcpStream::connect(node.addr).await.expect("connect");
        socket.write_all(b"GET /v1/str").await.expect("send");
        abandoned.push(socket);
    }
    still_healthy(&node).await;
    drop(abandoned);
    still_healthy(&node).await;
}
